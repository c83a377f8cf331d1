"""server.process_env: applied before torch is imported, and a user's own value wins."""
import os
import subprocess
import sys

from server import process_env


def test_apply_sets_defaults_and_keeps_the_users_value(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    process_env.apply()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    process_env.apply()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_entry_points_import_no_torch_before_main_applies_it():
    """torch reads the variable once, at its first allocation: importing the CLI must not import torch."""
    code = ("import sys, server.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
