# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export OMP_NUM_THREADS ?= 2
# Test workers (pytest-xdist), one per core of the project's 2-core machines; each test runs torch on one
# thread, and a file's tests share one worker (its session fixtures are built once).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-slow bench check style venv fashion-mnist qemu-user fixtures clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is pinned in this same pip command (constraints.txt): otherwise a multi-GB CUDA torch comes in.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST ships offline in Debian's dataset-fashion-mnist package.
fashion-mnist:
	@test -f $(FASHION) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# Debian's qemu-user runs one test process on an AVX2-only CPU model (`qemu-x86_64 -cpu Haswell`), where
# onnxruntime's int8 kernels differ from the graph's arithmetic (tests/test_kernels.py).
qemu-user:
	@test "$$(uname -m)" != x86_64 || command -v qemu-x86_64 >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user; }

demo: $(STAMP)
	$(VENV)/bin/efrap demo --out demo-out

test: $(STAMP) fashion-mnist qemu-user
	$(PYTEST)

test-slow: $(STAMP) fashion-mnist
	$(PYTEST) -m slow

# The committed test models (tests/fixtures): rebuild only on purpose, then commit the new files.
fixtures: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/fixtures/build.py

bench: $(STAMP) fashion-mnist
	$(PY) benchmarks/run.py --out benchmarks/results

check: $(STAMP)
	$(VENV)/bin/ruff check efrap_plugin efrap_cli adapters tests benchmarks examples
	$(VENV)/bin/ruff format --check efrap_plugin efrap_cli adapters tests benchmarks examples

style: $(STAMP)
	$(VENV)/bin/ruff check --fix efrap_plugin efrap_cli adapters tests benchmarks examples
	$(VENV)/bin/ruff format efrap_plugin efrap_cli adapters tests benchmarks examples

clean:
	rm -rf $(VENV) demo-out .pytest_cache
