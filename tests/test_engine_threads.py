"""One OpenMP team per process: building the engine leaves none in the building thread, the engine thread
runs at the thread count it was built with, and helper threads run torch ops inline (server.engine.threads).

Each case runs in a fresh interpreter: a team, once made, lasts as long as its thread, and pytest's main
thread has made one long before this test. The control (`serial` replaced by a no-op) shows the count of
OS threads does see a team appear, so the check can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import contextlib, json, os, sys, threading
import torch
torch.set_num_threads(2)
from server.config import EngineConfig
from server.engine import factory, threads
from server.engine.request import SamplingParams

def os_threads():
    return len(os.listdir("/proc/self/task"))

if sys.argv[3] == "control":
    @contextlib.contextmanager
    def no_op():
        yield torch.get_num_threads()
    threads.serial = no_op

before = os_threads()
engine = factory.build_engine(EngineConfig(model=sys.argv[1], adapter_dir=sys.argv[2], max_batch=4))
built = os_threads()
seen = []
step = engine.step
def watched_step():
    seen.append(torch.get_num_threads())
    step()
engine.step = watched_step
engine.start()
done = threading.Event()
params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
engine.submit(engine.make_request([5, 6, 7], params), lambda out: out.finished and done.set())
assert done.wait(120)

helper = {}
def in_helper():
    threads.inline_parallel_ops()
    x = torch.ones(1 << 22)
    helper["before"] = os_threads()
    (x + x).sum()  # 4M elements: a parallel op, unless it runs inline
    helper["after"] = os_threads()
    helper["threads"] = torch.get_num_threads()
t = threading.Thread(target=in_helper)
t.start(); t.join()
print(json.dumps({"team_in_builder": built - before, "engine_threads": sorted(set(seen)),
                  "main_threads_after": torch.get_num_threads(), "helper": helper}))
engine.shutdown()
"""


def run_case(model: Path, store: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(store), mode], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
def test_build_makes_no_team_and_engine_thread_keeps_its_threads(tiny_checkpoints, tmp_path):
    served = run_case(tiny_checkpoints["llama"], tmp_path / "store", "serial")
    control = run_case(tiny_checkpoints["llama"], tmp_path / "store2", "control")
    assert control["team_in_builder"] == served["team_in_builder"] + 1, (served, control)  # the control's team
    assert served["engine_threads"] == [2]
    assert served["main_threads_after"] == 2  # serial() restored the builder's count
    helper = served["helper"]
    assert helper["after"] == helper["before"] and helper["threads"] == 1
