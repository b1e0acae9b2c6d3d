# Two commands on a fresh machine:
#   make demo   set up (venv, pinned torch, build) and run the main job
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
# Test-only packages that list torch among their requirements: installed without their
# dependencies so that they cannot replace the pinned torch (requirements-dev.txt says why
# each is there).
NODEPS_TEST = k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2 \
              transformers==5.25.0 tokenizers==0.23.3

.PHONY: setup demo test bench bench-quick readme-demo dev clean gpu-check

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first and alone: the pinned CPU build lies on disk, while an unpinned
# torch would download a multi-GB CUDA build. Then the package is built against it with
# --no-build-isolation, so the C++ extension is compiled now rather than on first use.
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py MANIFEST.in epd_kernels/_extension.py \
          requirements-dev.txt $(wildcard csrc/*)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps $(NODEPS_TEST)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $(STAMP)

setup: $(STAMP)

# Development: an editable install that rebuilds the C++ extension in place.
dev: $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0 && $(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps $(NODEPS_TEST)
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: setup
	$(VENV)/bin/epd demo --out epd_demo_out

# The installed package is tested (pytest's entry point keeps the source tree off sys.path).
test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench-quick: setup
	$(PY) benchmarks/run.py --quick --all --markdown BENCHMARKS.md --readme README.md

bench: setup
	$(PY) benchmarks/run.py --all --markdown BENCHMARKS.md --readme README.md

# On a machine with a CUDA GPU (a few minutes): the tests marked gpu, with the compiled
# Triton kernels, then the kernels section at 256 MB (an fp32 x of 64M elements, K = 3)
# against copy_ and torch.compile, with the op's targets marked met / missed.
gpu-check: setup
	TRITON_INTERPRET=0 $(VENV)/bin/pytest -q -p no:cacheprovider -m gpu -rs tests
	TRITON_INTERPRET=0 $(PY) benchmarks/run.py --sections kernels --device cuda --sizes 64M --ks 3 --dtypes float32 --repeats 10 --out benchmarks/results/gpu-check

# The README's demo table and pictures, from a real run into docs/demo/.
readme-demo: setup
	$(PY) tools/readme_demo.py --out docs/demo

clean:
	rm -rf build *.egg-info $(VENV) epd_demo_out benchmarks/results
