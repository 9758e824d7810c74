# gmem: `make test` and `make demo` set up what they need, then run.
#
#   make test               builds .venv (cached, see tools/venv.sh), installs gmem, runs every test
#   make demo               same environment, then the GAN memory demo (outputs in runs/demo/)
#   make test VENV=system   no environment, no installs, no network: uses the python on PATH as it is
#                           (torch etc. preinstalled); the C++ extension is JIT-built if possible.
VENV ?= .venv
PYTEST_ARGS ?=

ifeq ($(VENV),system)
PY := python3
ENV_STAMP :=
else
PY := $(VENV)/bin/python
ENV_STAMP := build/.installed
endif

export OMP_NUM_THREADS ?= 2

.PHONY: test demo venv install test-cpp bench-quick clean

venv:
	@bash tools/venv.sh

# Installing builds the C++ (and, with a CUDA toolkit, CUDA) extension in place; the stamp lives in
# the clone, so each clone installs once and later runs start at once. The cached environment is
# shared by clones, so its editable install points at the clone that installed last; every clone
# installs itself on its first make, and imports from a clone's root find that clone's gmem first.
build/.installed: setup.py gmem/ops/_ext_build.py $(shell find csrc -type f) | venv
	@mkdir -p build
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

install: $(ENV_STAMP)

test: install test-cpp
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# C++ unit tests of the CPU kernels (ctest) and an nvcc compile of every CUDA source (nothing runs)
test-cpp:
	@bash tools/test_cpp.sh

demo: install
	$(PY) -m gmem.cli demo

bench-quick: install
	$(PY) -m benchmarks.run --quick --device cpu

clean:
	rm -rf build *.egg-info gmem/*.so .pytest_cache
