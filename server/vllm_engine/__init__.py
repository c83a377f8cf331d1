"""``--engine vllm``: the engine-client contract (server.engine_client) served by vLLM in a worker process.

- ``client``: VllmEngineClient, the contract, in the server's process;
- ``worker``: the worker script, run by the vLLM venv's python (standard library + vLLM only);
- ``params``: what vLLM cannot serve is refused, sampling params translated, LoRA snapshots for vLLM's loader;
- ``stream``: one request's output stream, fed by the worker's events.
"""
