# The two commands the README names: `make demo` and `make test`.
# Both bootstrap what is missing (a project-local .venv with PyPI's torch==2.11.0,
# whose libtorch tch links against) and build with LIBTORCH_USE_PYTORCH=1.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
export VIRTUAL_ENV := $(ROOT)/.venv
export PATH := $(ROOT)/.venv/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
CARGO ?= cargo

.PHONY: bootstrap build test demo fixtures tiny-sd browser-check

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release

# cargo test (two tests at a time, one torch thread each), then the serve page
# in headless Chromium (Debian's package, installed when missing): scripts/test.sh.
test: bootstrap
	CARGO=$(CARGO) bash scripts/test.sh

demo: build
	bash scripts/demo.sh

# `sdtune serve`'s page in headless Chromium (installs Debian's chromium when
# missing and run as root); rewrites samples/serve-page.png (`test` runs the
# same check with its screenshot under target/).
browser-check: build
	bash scripts/browser-check.sh

# Makes models/tiny-sd/ (the built-in demo model) from scratch on the CPU; see the script.
tiny-sd: bootstrap
	bash scripts/make-tiny-sd.sh

# Regenerates tests/fixtures with the pinned Python reference stack (not needed to test).
fixtures:
	bash scripts/fixtures/setup-venv.sh
	.venv-ref/bin/python scripts/fixtures/make_fixtures.py
	.venv-ref/bin/python scripts/fixtures/make_prepare_reference.py
	.venv-ref/bin/python scripts/fixtures/make_scheduler_cases.py
	.venv-ref/bin/python scripts/fixtures/make_lora_cases.py
	.venv-ref/bin/python scripts/fixtures/make_lora_edit_reference.py
	.venv-ref/bin/python scripts/fixtures/make_lycoris_cases.py
	.venv-ref/bin/python scripts/fixtures/make_lycoris_sample_cases.py
	.venv-ref/bin/python scripts/fixtures/make_single_file.py
	.venv-ref/bin/python scripts/fixtures/make_tf5_fixture.py
	.venv-ref/bin/python scripts/fixtures/make_sdxl_fixture.py
	.venv-ref/bin/python scripts/fixtures/make_sdxl_single_file.py
	.venv-ref/bin/python scripts/fixtures/make_sdxl_lora_cases.py
	.venv-ref/bin/python scripts/fixtures/make_sdxl_lora_reference.py
	.venv-ref/bin/python scripts/fixtures/make_sdxl_adapter_cases.py
	.venv-ref/bin/python scripts/fixtures/make_te_lora_cases.py
	.venv-ref/bin/python scripts/fixtures/make_dora_cases.py
	.venv-ref/bin/python scripts/fixtures/make_locon_cases.py
	.venv-ref/bin/python scripts/fixtures/make_vae_tiling_reference.py
	.venv-ref/bin/python scripts/fixtures/make_flop_reference.py
