"""RayRequestStream without Ray: a replica failing before any output is retried, after output it ends the request
with an error naming the replica (the integration test, tests/test_ray_serve.py, kills a real replica)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from server.engine.request import Request, RequestOutput, SamplingParams
from server.serve.client import RayRequestStream
from server.serve.metrics import RayIngressMetrics


class _FakeCall:
    """A DeploymentResponseGenerator that yields ``items`` (raising an exception item) then ends."""

    def __init__(self, items):
        self.items = list(items)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        pass


def test_stream_retries_before_output_and_fails_clearly_after():
    def output(done: bool) -> RequestOutput:
        return RequestOutput("r", [1], "x", None, done, "length" if done else None, 2, 1)

    def client(calls):
        handle = SimpleNamespace(options=lambda **kw: SimpleNamespace(
            generate=SimpleNamespace(remote=lambda payload: _FakeCall(calls.pop(0)))))
        return SimpleNamespace(handle=handle, retries=2, streams=set(), metrics=RayIngressMetrics(None))

    async def drain(calls):
        c = client(calls)
        outputs = [o async for o in RayRequestStream(c, Request([1, 2], SamplingParams()))]
        return outputs, c.metrics

    head = {"replica": "EngineReplica#a", "hit": None}
    died = RuntimeError("actor died")
    outputs, metrics = asyncio.run(drain([[died], [{**head, "replica": "EngineReplica#b", "outputs": [output(True)]}]]))
    assert [o.finish_reason for o in outputs] == ["length"] and metrics.retries._value.get() == 1
    outputs, metrics = asyncio.run(drain([[{**head, "outputs": [output(False)]}, died]]))
    assert [o.finish_reason for o in outputs] == [None, "error"] and "EngineReplica#a failed" in outputs[1].error
    assert metrics.retries._value.get() == 0 and metrics.replica_failures._value.get() == 1
