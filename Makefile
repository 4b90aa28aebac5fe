# Two commands do all set-up on a fresh machine:
#   make demo   recognise the bundled sample photos with the embedded model
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/wanwu: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/wanwu

demo: setup
	rm -f demo-results.jsonl
	$(BIN)/wanwu run samples --out demo-results.jsonl
	$(BIN)/wanwu show demo-results.jsonl

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-results.jsonl *.egg-info
