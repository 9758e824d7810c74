# gmem: `make test` and `make demo` set up what they need, then run.
#
#   make test               makes .venv (see tools/venv.sh), builds the extension in place, runs every test
#   make demo               same environment, then the GAN memory demo (outputs in runs/demo/)
#   make lint               ruff check and the import-linter layering contract (both configured in pyproject.toml)
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

.PHONY: test demo venv install lint test-cpp browser bench-quick clean FORCE

# .venv is this clone's own small environment over the shared cached one; tools/venv.sh leaves it
# (and this file's time stamp) alone when it is up to date, and remakes it when the pins change.
$(VENV)/.gmem-shared: FORCE
	@bash tools/venv.sh $(VENV)

venv: $(VENV)/.gmem-shared

# The extension is built in place (gmem/_C*.so, in this clone), once per clone and again when its
# sources or the environment change. The compiler's output goes to build/ext.log, shown on failure.
build/.installed: setup.py pyproject.toml gmem/ops/_ext_build.py $(shell find csrc -type f) $(VENV)/.gmem-shared
	@mkdir -p build
	@echo "gmem: building the C++ extension in place (log: build/ext.log)"
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) setup.py --quiet build_ext --inplace >build/ext.log 2>&1 \
		|| { tail -n 40 build/ext.log; echo "gmem: extension build failed, see build/ext.log"; exit 1; }
	@touch $@

install: $(ENV_STAMP)

test: install lint test-cpp browser
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Headless Chromium for the browser test of `gmem serve` (installed when missing, if this user may)
browser:
	@mkdir -p build
	@bash tools/chromium.sh

# Part of `make test`: ruff, then import-linter's layering contract (docs/design.md section 5). With
# VENV=system a python without ruff or import-linter skips that check, saying so.
LINT_IMPORTS := import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())

lint: $(if $(ENV_STAMP),venv)
	@if [ "$(VENV)" = system ] && ! $(PY) -m ruff --version >/dev/null 2>&1; then \
		echo "gmem: ruff is not installed for $(PY): ruff skipped (VENV=system)"; \
	else $(PY) -m ruff check .; fi
	@if [ "$(VENV)" = system ] && ! $(PY) -c "import importlinter" >/dev/null 2>&1; then \
		echo "gmem: import-linter is not installed for $(PY): layering check skipped (VENV=system)"; \
	else $(PY) -c "$(LINT_IMPORTS)"; fi

# C++ unit tests of the CPU kernels (ctest) and an nvcc compile of every CUDA source (nothing runs)
test-cpp:
	@bash tools/test_cpp.sh

demo: install
	$(PY) -m gmem.cli demo

bench-quick: install
	$(PY) -m benchmarks.run --quick --device cpu

clean:
	rm -rf build *.egg-info gmem/*.so .pytest_cache
