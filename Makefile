# The two commands of the README: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,loadtest]"
	$(PY) -m server.model.lora_ext
	touch $(STAMP)

.PHONY: install serve test bench-engine
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/adapter-server $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench-engine: $(STAMP)
	$(PY) -m loadtest.bench_engine $(ARGS)
