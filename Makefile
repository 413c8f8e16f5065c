# `make demo` and `make test` each bootstrap a fresh machine: FFmpeg from Debian's packages when absent, then a
# .venv with torch==2.13.0 installed first (without the pin pip would pull the multi-GB CUDA build), then
# the project and its dependencies. `make test` also installs Chromium, which renders `reelmend report`'s page
# headless in tests/jobs/test_report.py.
PY ?= python3
# Where torch comes from: empty = pip's configured index (plain PyPI serves the CUDA build); on a CPU-only
# machine `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build.
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test ffmpeg chromium clean

demo: $(STAMP) ffmpeg
	$(BIN)/reelmend demo

test: $(STAMP) ffmpeg chromium
	REELMEND_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest tests

ffmpeg:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg; }

chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[demo,test]"
	touch $(STAMP)

clean:
	rm -rf .demo
