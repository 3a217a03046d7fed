# make demo   fresh machine -> .venv, pinned torch, build, then the main job (demo_out/)
# make test   fresh machine -> .venv, pinned torch, build, CUDA compile check, pytest
# make bench  CPU microbenchmarks with ratios (benchmarks/RESULTS.md records them)
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-torch-$(TORCH_VERSION)
export MAX_JOBS ?= 2

.PHONY: test build cuda-check bench demo clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" ninja setuptools wheel numpy \
		pytest hypothesis pytest-benchmark safetensors tqdm scikit-learn scipy pillow
	touch $@

# The editable install picks up Python edits by itself: pip (and its warnings) runs again
# only when the build inputs change.
INSTALLED := $(VENV)/.sarkernels-installed
$(INSTALLED): $(STAMP) setup.py pyproject.toml $(shell find csrc -type f)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(INSTALLED)
	$(PY) -m sarkernels info

cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then \
		cmake -S . -B build/cuda-check >/dev/null && \
		cmake --build build/cuda-check --target cuda_compile_check; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

test: build cuda-check
	$(PY) -m pytest python_tests -q

bench: build
	$(PY) -m pytest benchmarks -q -rs --benchmark-columns=median,iqr,rounds \
		--benchmark-group-by=group --benchmark-sort=name --benchmark-json=benchmarks/last.json
	$(PY) benchmarks/report.py

demo: build
	$(PY) -m sarkernels demo --out demo_out

clean:
	rm -rf build *.egg-info sarkernels/*.so
