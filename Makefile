# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use and install the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# the oldest timm pyproject.toml declares, installed beside the environment's own (no second torch)
TIMM_MIN := $(shell sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
COMPAT := $(VENV)/compat/timm-$(TIMM_MIN)

.PHONY: demo test test-slow test-all test-compat test-timm install bench clean system-deps system-deps-demo

# Debian packages: the demo needs the offline Fashion-MNIST, the suite also FFmpeg's libraries (TorchCodec's videos).
# Installed with apt-get when run as root, else one line says what to install, before any work starts.
system-deps-demo:
	@sh scripts/system-deps dataset-fashion-mnist

system-deps:
	@sh scripts/system-deps dataset-fashion-mnist ffmpeg

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision pinned together so pip picks matching builds
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: system-deps-demo $(STAMP)
	$(BIN)/tokenthrift demo

test: system-deps $(STAMP)
	$(BIN)/lint-imports
	# two workers for two cores (much of the suite is Python and compile time, not arithmetic); a test file
	# stays on one worker, so its module fixtures (trained tiny runs) are built once. The tests marked slow
	# (minutes each: the demo's tables, the shipped models' top-1, exports at every batch, the compare recipe,
	# LTM calibration, the video pipeline, DDP) run in test-slow, which CI runs too
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-slow: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow tests

test-all: test test-slow

$(COMPAT)/.installed: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target $(COMPAT) "timm==$(TIMM_MIN)"
	touch $@

# the whole suite against the declared minimum timm (put first on the path)
test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(COMPAT) $(BIN)/python -c "import timm; assert timm.__version__ == '$(TIMM_MIN)', timm.__version__"
	PYTHONPATH=$(COMPAT) $(BIN)/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider tests

# timm's own tests/test_models.py (from the sdist of the installed timm, fetched by pip, not kept in the repository)
# against every model tokenthrift registers; selection and skips explained in tests_timm/conftest.py
TIMM_TESTS := $(VENV)/timm-tests
test-timm: $(STAMP)
	$(BIN)/python tests_timm/fetch.py $(TIMM_TESTS)
	cp tests_timm/conftest.py $(TIMM_TESTS)/conftest.py
	cd $(TIMM_TESTS) && HF_HUB_OFFLINE=1 ../bin/python -m pytest -q -ra -p no:cacheprovider .

bench: $(STAMP)
	$(BIN)/python benchmarks/toe_step_speed.py

clean:
	rm -rf $(VENV) runs
