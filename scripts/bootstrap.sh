#!/usr/bin/env bash
# Installs what sdtune needs to build: a project-local virtualenv holding
# PyPI's torch==2.11.0, whose bundled libtorch tch 0.24 links against.
# Idempotent: a second run only checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
want="2.11.0"

have_torch() {
  [ -x "$venv/bin/python" ] &&
    "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$want' else 1)" 2>/dev/null
}

if have_torch; then
  exit 0
fi
echo "sdtune: installing torch==$want into .venv (libtorch for the build; one time)" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==$want"
have_torch || { echo "sdtune: torch $want did not install into $venv; check pip's output above" >&2; exit 1; }
