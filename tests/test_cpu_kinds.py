"""Other CPU kinds' code paths, forced on this machine.

The C++ kernels are compiled with -march=native, so the code that runs differs by CPU kind: the
compiler vectorizes for AVX2 on an EPYC Zen 3, for AVX-512 on an Intel Xeon model 207, and with
AVX512-BF16 conversions on a Zen 4 or an AMX Xeon. A session only ever has one kind, so the kernel
tests are run here again against builds for the other kinds' instruction sets
(ADAPTER_SERVER_EXT_MARCH), in a subprocess because the built module is process-global. A build
needs a compiler and a CPU that can run it (a Zen 3 cannot run x86-64-v4 code).

(bitsandbytes' AVX512-BF16 repack is forced in tests/test_train.py, tests/test_quant_dequantize.py
and the NF4 golden tests; bf16 compute runs in the bf16 golden tests on every kind, emulated where
the CPU has no bf16.)
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_attention.py", "tests/test_adapter_ops.py", "tests/test_fused_ops.py", "tests/test_qgemm.py",
                "tests/test_bf16_gemm.py"]

# -march -> (the kind whose vectorized code it is, the cpuinfo flags a CPU needs to run it)
KINDS = {
    "x86-64-v3": ("AMD EPYC Zen 3: AVX2 + FMA", {"avx2", "fma", "bmi2", "f16c", "movbe"}),
    "x86-64-v4": ("Intel Xeon model 207: AVX-512, no BF16", {"avx2", "fma", "avx512f", "avx512bw", "avx512cd",
                                                              "avx512dq", "avx512vl"}),
    # qgemm (qgemm_cpu.cpp) has a VNNI path: AVX-512 + VNNI without BF16 is the Intel Xeon model 207 (Cascade Lake)
    "cascadelake": ("Intel Xeon model 207: AVX-512 + VNNI, no BF16", {"avx2", "fma", "avx512f", "avx512bw",
                                                                      "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"}),
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def run(march: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTER_SERVER_EXT_MARCH": march}
    env.pop("ADAPTER_SERVER_NO_EXT", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("march", list(KINDS))
def test_kernels_built_for_another_cpu_kind_pass_the_kernel_tests(march):
    kind, needs = KINDS[march]
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 instruction sets")
    if missing := needs - cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code ({kind}): no {', '.join(sorted(missing))}")
    built = run(march, "-c", "from server.model import cpu_ext; m = cpu_ext.kernel(); "
                             "print('MODULE', m.__file__ if m is not None else None)")
    if "MODULE None" in built.stdout and os.environ.get("ADAPTER_SERVER_NO_EXT") == "1":
        pytest.skip("ADAPTER_SERVER_NO_EXT=1")
    tag = march.replace("-", "_")
    assert built.returncode == 0 and f"adapter_server_cpu_{tag}" in built.stdout, built.stdout + built.stderr
    tests = run(march, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *KERNEL_TESTS)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "no compiler" not in tests.stdout, tests.stdout[-4000:]


def test_an_unsafe_march_is_refused(monkeypatch):
    from server.model import cpu_ext

    monkeypatch.setenv("ADAPTER_SERVER_EXT_MARCH", "native -fplugin=x.so")
    with pytest.raises(ValueError, match="not an -march value"):
        cpu_ext.march_flag()
    monkeypatch.setenv("ADAPTER_SERVER_EXT_MARCH", "x86-64-v3")
    assert cpu_ext.march_flag() == "x86-64-v3"
