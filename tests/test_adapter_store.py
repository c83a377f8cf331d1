"""adapters.store: atomic, indexed, crash-safe adapter store on disk."""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from adapters import store as store_mod
from adapters.format import AdapterError, BaseSpec, load_adapter
from adapters.store import (AdapterExists, AdapterNotFound, AdapterRecord, AdapterStore, AdapterTooLarge,
                            StoreError)

SPEC = BaseSpec.from_hf_config(LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=256, vocab_size=300), "tiny")


def make_lora_dir(path: Path, *, r: int = 4, seed: int = 0, modules=("q_proj", "v_proj"), extra_files=True) -> Path:
    """A PEFT-format LoRA adapter for SPEC, written by hand (same layout PEFT writes)."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(SPEC.num_layers):
        for m in modules:
            fan_in, fan_out = SPEC.module_shapes[m]
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=g)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "bias": "none",
              "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
              "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    if extra_files:
        (path / "README.md").write_text("# adapter\n")
        (path / "tokenizer.json").write_text("{}")
        (path / "training_args.bin").write_bytes(b"\x80\x04pickle")
    return path


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staging_empty(root: Path) -> bool:
    return not any((root / ".staging").iterdir()) and not list(root.glob(".index.json.*"))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


def test_round_trip(tmp_path, root):
    src = make_lora_dir(tmp_path / "src", r=4)
    st = AdapterStore(root)
    assert st.list() == []
    rec = st.add("my-adapter_1.0", src)
    assert isinstance(rec, AdapterRecord)
    assert (rec.name, rec.kind, rec.rank, rec.target_modules, rec.base_model, rec.num_virtual_tokens) == (
        "my-adapter_1.0", "lora", 4, ("q_proj", "v_proj"), "tiny", 0)
    assert rec.sha256 == file_sha(src / "adapter_model.safetensors")
    stored = st.path("my-adapter_1.0")
    assert sorted(p.name for p in stored.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert rec.size_bytes == sum(p.stat().st_size for p in stored.iterdir())
    assert datetime.fromisoformat(rec.created_at).utcoffset().total_seconds() == 0
    assert st.get("my-adapter_1.0") == rec
    assert st.list() == [rec]
    d = rec.to_dict()
    assert d["target_modules"] == ["q_proj", "v_proj"] and json.loads(json.dumps(d)) == d
    assert AdapterRecord.from_dict(d) == rec
    assert json.loads((root / "index.json").read_text())["adapters"]["my-adapter_1.0"] == d
    # a fresh store (another process, a restart) sees the same
    assert AdapterStore(root).list() == [rec]
    # the stored copy loads
    assert load_adapter(stored, SPEC, max_rank=8).rank == 4

    st.add("b", make_lora_dir(tmp_path / "src2", seed=2))
    assert [r.name for r in st.list()] == ["b", "my-adapter_1.0"]
    st.delete("my-adapter_1.0")
    assert not stored.exists()
    with pytest.raises(AdapterNotFound, match="my-adapter_1.0"):
        st.get("my-adapter_1.0")
    with pytest.raises(KeyError):
        st.path("my-adapter_1.0")
    with pytest.raises(AdapterNotFound):
        st.delete("my-adapter_1.0")
    assert [r.name for r in st.list()] == ["b"]
    assert staging_empty(root)


def test_error_types():
    for exc, status in ((AdapterNotFound, 404), (AdapterExists, 409), (AdapterTooLarge, 413)):
        assert issubclass(exc, StoreError) and exc.http_status == status
    assert issubclass(AdapterNotFound, KeyError)
    assert str(AdapterNotFound("adapter 'x' not found")) == "adapter 'x' not found"
    assert AdapterError.http_status == 400


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, ".hidden", "a..b", "-x", "a b", "é", "..", "x\n"])
def test_bad_names_refused(tmp_path, root, name):
    src = make_lora_dir(tmp_path / "src")
    st = AdapterStore(root)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        st.add(name, src)
    for fn in (st.get, st.path, st.delete):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            fn(name)
    assert st.list() == [] and not any((root / "adapters").iterdir()) and staging_empty(root)
    assert not (tmp_path / "x").exists()


def test_name_limits_accepted(tmp_path, root):
    st = AdapterStore(root)
    for name in ("x" * 64, "A", "9.v-1_b", "index.json"):
        st.add(name, make_lora_dir(tmp_path / f"src-{len(st.list())}"))
    assert len(st.list()) == 4 and (root / "index.json").is_file()


def test_overwrite(tmp_path, root):
    st = AdapterStore(root)
    first = st.add("a", make_lora_dir(tmp_path / "v1", seed=1))
    v2 = make_lora_dir(tmp_path / "v2", seed=2, r=8)
    with pytest.raises(AdapterExists, match="'a' already exists"):
        st.add("a", v2)
    assert st.get("a") == first
    second = st.add("a", v2, overwrite=True)
    assert second.sha256 == file_sha(v2 / "adapter_model.safetensors") != first.sha256
    assert second.rank == 8 and st.get("a") == second and len(st.list()) == 1
    assert file_sha(st.path("a") / "adapter_model.safetensors") == second.sha256
    assert staging_empty(root)


def _assert_intact(st: AdapterStore, root: Path, rec: AdapterRecord, src: Path):
    assert st.get("a") == rec and AdapterStore(root).get("a") == rec
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (st.path("a") / f).read_bytes() == (src / f).read_bytes()
    assert staging_empty(root)


def test_overwrite_failure_mid_copy_keeps_old(tmp_path, root, monkeypatch):
    st = AdapterStore(root)
    v1 = make_lora_dir(tmp_path / "v1", seed=1)
    rec = st.add("a", v1)
    real_copy = store_mod._copy_file

    def failing_copy(src, dst):
        if Path(src).name == "adapter_model.safetensors":
            with open(dst, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(store_mod, "_copy_file", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        st.add("a", make_lora_dir(tmp_path / "v2", seed=2), overwrite=True)
    _assert_intact(st, root, rec, v1)


def test_overwrite_failure_at_commit_keeps_old(tmp_path, root, monkeypatch):
    st = AdapterStore(root)
    v1 = make_lora_dir(tmp_path / "v1", seed=1)
    rec = st.add("a", v1)

    def failing_write(entries):
        raise OSError("index write failed")

    monkeypatch.setattr(st, "_write_index", failing_write)
    with pytest.raises(OSError, match="index write failed"):
        st.add("a", make_lora_dir(tmp_path / "v2", seed=2), overwrite=True)
    with pytest.raises(OSError, match="index write failed"):
        st.add("new", make_lora_dir(tmp_path / "v3", seed=3))
    monkeypatch.undo()
    _assert_intact(st, root, rec, v1)
    assert not (root / "adapters" / "new").exists()

    real_rename = os.rename

    def failing_rename(src, dst):
        if "tmp." in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        st.add("a", make_lora_dir(tmp_path / "v4", seed=4), overwrite=True)
    monkeypatch.undo()
    _assert_intact(st, root, rec, v1)


def test_validate_hook(tmp_path, root):
    st = AdapterStore(root)
    seen = []

    def check(path: Path):
        seen.append(sorted(p.name for p in path.iterdir()))
        load_adapter(path, SPEC, max_rank=2)

    with pytest.raises(AdapterError, match="exceeds this server's max_rank 2"):
        st.add("a", make_lora_dir(tmp_path / "src", r=4), validate=check)
    assert seen == [["README.md", "adapter_config.json", "adapter_model.safetensors"]]
    assert st.list() == [] and not any((root / "adapters").iterdir()) and staging_empty(root)
    rec = st.add("a", make_lora_dir(tmp_path / "src2", r=2), validate=check)
    assert rec.rank == 2


def test_pickle_refused(tmp_path, root):
    src = make_lora_dir(tmp_path / "src")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_bytes(b"\x80\x04definitely not loaded")
    st = AdapterStore(root)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*pickle.*safe_serialization=True"):
        st.add("a", src)
    assert st.list() == [] and staging_empty(root)
    # other pickles next to a safetensors adapter (Trainer leftovers) are neither read nor copied
    src2 = make_lora_dir(tmp_path / "src2")
    st.add("b", src2)
    assert not (st.path("b") / "training_args.bin").exists()


def test_invalid_adapter_refused(tmp_path, root):
    src = make_lora_dir(tmp_path / "src")
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        AdapterStore(root).add("a", src)
    with pytest.raises(AdapterError, match="does not exist"):
        AdapterStore(root).add("a", tmp_path / "missing")


def test_too_large(tmp_path, root):
    src = make_lora_dir(tmp_path / "src")
    st = AdapterStore(root, max_adapter_bytes=1000)
    with pytest.raises(AdapterTooLarge, match="over the store limit of 1000 bytes"):
        st.add("a", src)
    assert st.list() == [] and staging_empty(root)


def test_reconcile_after_crash(tmp_path, root):
    st = AdapterStore(root)
    a = st.add("a", make_lora_dir(tmp_path / "a", seed=1))
    b = st.add("b", make_lora_dir(tmp_path / "b", seed=2))
    c = st.add("c", make_lora_dir(tmp_path / "c", seed=3))
    adapters, staging = root / "adapters", root / ".staging"
    # entry without a directory
    shutil.rmtree(adapters / "a")
    # a complete directory without an entry (crash after rename-in, before the index write)
    shutil.copytree(make_lora_dir(tmp_path / "d", seed=4), adapters / "d")
    # a half-written staging dir and a half-written index temp file
    (staging / "tmp.0123.e").mkdir()
    (staging / "tmp.0123.e" / "adapter_config.json").write_text("{")
    (root / ".index.json.abc.tmp").write_text("{")
    # an overwrite interrupted between "rename old aside" and "rename new in"
    os.rename(adapters / "b", staging / "old.4567.b")
    # an overwrite interrupted after "rename new in", before the index write: must roll back
    os.rename(adapters / "c", staging / "old.89ab.c")
    shutil.copytree(make_lora_dir(tmp_path / "c2", seed=5), adapters / "c")
    # junk in the adapters dir is ignored
    (adapters / "incomplete").mkdir()

    st2 = AdapterStore(root)
    names = [r.name for r in st2.list()]
    assert names == ["b", "c", "d"]
    assert st2.get("b") == b and st2.get("c") == c
    assert file_sha(st2.path("c") / "adapter_model.safetensors") == c.sha256
    assert st2.get("d").sha256 == file_sha(adapters / "d" / "adapter_model.safetensors")
    assert staging_empty(root)
    assert json.loads((root / "index.json").read_text())["adapters"].keys() == {"b", "c", "d"}
    del a


def test_completed_overwrite_leftover_removed(tmp_path, root):
    st = AdapterStore(root)
    st.add("a", make_lora_dir(tmp_path / "a1", seed=1))
    new = st.add("a", make_lora_dir(tmp_path / "a2", seed=2), overwrite=True)
    # crash after the index write, before the old dir was removed
    shutil.copytree(tmp_path / "a1", root / ".staging" / "old.ffff.a")
    st2 = AdapterStore(root)
    assert st2.get("a") == new and staging_empty(root)


def test_corrupt_index_rebuilt(tmp_path, root):
    st = AdapterStore(root)
    rec = st.add("a", make_lora_dir(tmp_path / "a"))
    (root / "index.json").write_text("{not json")
    st2 = AdapterStore(root)
    got = st2.get("a")
    assert (got.sha256, got.kind, got.rank) == (rec.sha256, rec.kind, rec.rank)
    json.loads((root / "index.json").read_text())


def test_recovery_leaves_live_staging_alone(tmp_path, root):
    AdapterStore(root)
    live = root / ".staging" / "tmp.live.x"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        AdapterStore(root)
        assert live.exists()
    finally:
        os.close(fd)
    AdapterStore(root)
    assert not live.exists()


def test_concurrent_adds_threads_and_instances(tmp_path, root):
    srcs = [make_lora_dir(tmp_path / f"s{i}", seed=i, extra_files=False) for i in range(8)]
    stores = [AdapterStore(root), AdapterStore(root)]
    errors = []

    def work(i):
        try:
            stores[i % 2].add(f"ad{i}", srcs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [r.name for r in AdapterStore(root).list()] == [f"ad{i}" for i in range(8)]


def _proc_add(root, src, names):
    st = AdapterStore(Path(root))
    for n in names:
        st.add(n, Path(src))


def test_concurrent_adds_processes(tmp_path, root):
    src = make_lora_dir(tmp_path / "src", extra_files=False)
    AdapterStore(root)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_proc_add, args=(str(root), str(src), [f"p{j}-{k}" for k in range(4)]))
             for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)  # a hang guard, not a timing: a loaded 2-core machine took over 30 s
    assert all(p.exitcode == 0 for p in procs)
    assert len(AdapterStore(root).list()) == 12


def test_symlinked_files_refused(tmp_path, root):
    src = make_lora_dir(tmp_path / "src")
    real = tmp_path / "elsewhere.safetensors"
    os.rename(src / "adapter_model.safetensors", real)
    os.symlink(real, src / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="symbolic link"):
        AdapterStore(root).add("a", src)
