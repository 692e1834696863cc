#!/usr/bin/env bash
# Installs what sdtune needs to build: a project-local virtualenv holding
# PyPI's torch==2.11.0, whose bundled libtorch tch 0.24 links against, and
# gloo's headers (Debian's libgloo-dev), which the wheel lacks and the
# data-parallel shim (src/native/distributed.cpp) compiles against.
# Idempotent: a second run only checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
want="2.11.0"

have_torch() {
  [ -x "$venv/bin/python" ] &&
    "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$want' else 1)" 2>/dev/null
}

# Without gloo's headers sdtune still builds, only `train --nproc` is off.
install_gloo_headers() {
  if [ -f /usr/include/gloo/rendezvous/store.h ] || [ -n "${SDTUNE_GLOO_INCLUDE:-}" ]; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "sdtune: installing libgloo-dev (gloo's headers, for train --nproc; one time)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev >/dev/null ||
      echo "sdtune: apt-get could not install libgloo-dev; sdtune builds without train --nproc" >&2
  else
    echo "sdtune: gloo's headers are missing and this is not root with apt-get; install libgloo-dev (or set SDTUNE_GLOO_INCLUDE) for train --nproc" >&2
  fi
}
install_gloo_headers

if ! have_torch; then
  echo "sdtune: installing torch==$want into .venv (libtorch for the build; one time)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==$want"
  have_torch || { echo "sdtune: torch $want did not install into $venv; check pip's output above" >&2; exit 1; }
fi

# The CUDA wheel's headers lack CUDA's crt/ and CCCL parts, which
# ProcessGroupNCCL.hpp includes: NVIDIA's header wheels of the same CUDA
# version supply them, so the shim's NCCL part compiles (build.rs checks).
install_cuda_headers() {
  local site cu
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [ -f "$site/torch/lib/libtorch_cuda.so" ] || return 0
  [ -f "$site/nvidia/cu13/include/crt/host_config.h" ] && [ -e "$site/nvidia/cu13/include/nv/target" ] && return 0
  cu="$("$venv/bin/python" -c 'from importlib.metadata import version; print(".".join(version("nvidia-cuda-runtime").split(".")[:2]))' 2>/dev/null)" || return 0
  echo "sdtune: installing CUDA $cu's crt and CCCL headers into .venv (for the NCCL part of train --nproc; one time)" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps "nvidia-cuda-crt==$cu.*" "nvidia-cuda-cccl==$cu.*" ||
    echo "sdtune: CUDA's headers did not install; sdtune builds with Gloo (CPU) data parallel only" >&2
}
install_cuda_headers
