"""Reliability: capacity limits, deterministic stores, exports that release their pages,
concurrent saves, and the soak script's bounded run."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rotatekv
from reference import assert_same_snapshot, default_inv_freq, make_kv, snapshot
from rotatekv import KVStore, QuantConfig, RotationPlan
from test_errors import bool_likes, int_likes, tensor_likes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("residual", [0, 8])
def test_appends_past_max_tokens_raise_and_change_nothing(gen, residual):
    store = KVStore(
        2, 2, 16, batch_size=2, config=QuantConfig(bits=2, residual=residual), max_tokens=40
    )
    assert store.max_tokens == 40
    k, v = make_kv(gen, 2, 2, 30, 16)
    store.append(0, k, v)
    probe = torch.randn(2, 4, 1, 16, generator=gen)
    before = snapshot(store, probe)
    k2, v2 = make_kv(gen, 2, 2, 11, 16)
    with pytest.raises(rotatekv.CapacityError) as e:
        store.append(0, k2, v2)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, rotatekv.RotateKVError)
    assert "max_tokens = 40" in str(e.value) and "layer 0" in str(e.value)
    assert_same_snapshot(before, snapshot(store, probe))
    # Tokens masked out by `valid` do not count: 10 valid of 11 fit exactly.
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[:, 3] = False
    store.append(0, k2, v2, valid=valid)
    assert store.seq_lens(0) == [40, 40]
    # Other layers have their own count.
    store.append(1, k2, v2)
    assert store.seq_lens(1) == [11, 11]
    # Room made by truncation can be used again.
    store.truncate(35)
    store.append(0, k2[:, :, :5], v2[:, :, :5])
    assert store.seq_lens(0) == [40, 40]


def test_max_tokens_setter_save_and_load(gen, tmp_path):
    store = KVStore(1, 2, 16, config=QuantConfig(bits=4))
    assert store.max_tokens is None
    k, v = make_kv(gen, 1, 2, 20, 16)
    store.append(0, k, v)
    for bad in (0, -3, 19):
        with pytest.raises(rotatekv.ArgumentError, match="max_tokens"):
            store.max_tokens = bad
    assert store.max_tokens is None
    store.max_tokens = 20
    with pytest.raises(rotatekv.CapacityError):
        store.append(0, k[:, :, :1], v[:, :, :1])
    store.save(tmp_path / "s.safetensors")
    back = KVStore.load(tmp_path / "s.safetensors")
    assert back.max_tokens == 20
    with pytest.raises(rotatekv.CapacityError):
        back.append(0, k[:, :, :1], v[:, :, :1])
    back.max_tokens = None
    back.append(0, k[:, :, :1], v[:, :, :1])
    assert back.seq_lens(0) == [21]
    with pytest.raises(rotatekv.ArgumentError, match="max_tokens"):
        KVStore(1, 2, 16, max_tokens=0)


def test_the_same_appends_give_bit_identical_stores(gen):
    """Tokens of several precision classes in one append: page order (and so the order in
    which attention sums pages) must not depend on hash order."""
    hkv, d, t = 2, 32, 150
    k, v = make_kv(gen, 2, hkv, t, d)
    bits = torch.tensor([2, 3, 4, 8, 16], dtype=torch.int64).repeat(2 * t // 5 + 1)[: 2 * t]
    bits = bits.reshape(2, t)
    q = torch.randn(2, 4, 3, d, generator=gen)
    outs, layouts = [], []
    for _ in range(4):
        s = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2))
        s.append(0, k, v, bits=bits)
        outs.append(s.attend(0, q))
        layouts.append([(b.bits, b.start, b.length) for b in s.page_buffers(0, 1)])
    for o, lay in zip(outs[1:], layouts[1:], strict=True):
        assert lay == layouts[0]
        assert torch.equal(o, outs[0])


def test_exports_hold_their_page_and_release_it(gen):
    store = KVStore(1, 2, 16, config=QuantConfig(bits=2))
    k, v = make_kv(gen, 1, 2, 10, 16)
    store.append(0, k, v)
    buf = store.page_buffers(0, 0)[0]
    assert buf.owners == 2  # the store and the buffer
    exports = [torch.from_dlpack(buf), np.from_dlpack(buf), torch.from_dlpack(buf)[3:]]
    assert buf.owners == 5
    snap = exports[0].clone()
    del store
    gc.collect()
    assert buf.owners == 4
    assert torch.equal(exports[0], snap)
    exports.clear()
    gc.collect()
    assert buf.owners == 1
    # A capsule that is never consumed releases its page too.
    cap = buf.__dlpack__()
    assert buf.owners == 2
    del cap
    gc.collect()
    assert buf.owners == 1


def test_concurrent_saves_to_one_path_leave_a_whole_file(gen, tmp_path):
    """Each save writes its own temporary file and renames it, so racing saves end with one
    complete store, never a mix."""
    path = tmp_path / "race.safetensors"
    stores = []
    for n in (30, 50, 70, 90):
        s = KVStore(1, 2, 16, config=QuantConfig(bits=2))
        k, v = make_kv(gen, 1, 2, n, 16)
        s.append(0, k, v)
        stores.append(s)
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def save(s: KVStore) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                s.save(path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    back = KVStore.load(path)
    assert back.seq_lens(0)[0] in (30, 50, 70, 90)
    assert [p.name for p in tmp_path.iterdir()] == ["race.safetensors"]


def test_plans_are_checked_before_they_reach_a_store(gen, tmp_path):
    plan = RotationPlan.hadamard(2, 2, 16, mode="pre_rope")
    path = tmp_path / "p.safetensors"
    plan.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last value clip
    path.write_bytes(bytes(data))
    with pytest.raises(rotatekv.FormatError, match="checksum"):
        RotationPlan.load(path)


def test_soak_script_runs_bounded_and_finds_no_growth(tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benches", "soak.py"), "--seconds", "6"]
        + ["--json", str(out), "--check"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["iterations"] > 0 and rep["rss_growth_bytes"] is not None


# A fuzzer over call sequences: a store of fuzzed settings, then fuzzed calls of every public
# method. Only rotatekv errors may come out, and a call that fails leaves the store as it was.
FB, FH, FD = 2, 2, 16


@st.composite
def store_args(draw: st.DrawFn) -> dict[str, object]:
    mode = draw(st.sampled_from(["pre_rope", "post_rope", "none"]))
    cfg = {
        "bits": draw(st.sampled_from([2, 3, 4, 8, 16])),
        "group_size": draw(st.sampled_from([None, 8, 16])),
        "residual": draw(st.sampled_from([0, 0, 3, 40])),
        "key_layout": draw(st.sampled_from(["per_token", "per_channel"])),
        "page_tokens": draw(st.sampled_from([None, 32, 64])),
        "fp_format": draw(st.sampled_from(["float16", "bfloat16"])),
    }
    return {
        "plan": RotationPlan.hadamard(2, FH, FD, mode=mode),
        "config": QuantConfig(**cfg),
        "rope_inv_freq": default_inv_freq(FD),
        "max_tokens": draw(st.sampled_from([None, None, 20, 100])),
    }


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, tuple, dict]:
    name = draw(
        st.sampled_from(
            ["append", "append", "attend", "truncate", "reorder", "dequantize", "page_buffers"]
            + ["seq_lens", "max_tokens", "save_load"]
        )
    )
    layer = draw(st.sampled_from([0, 1, 1, -1, 2, "0", 1.0]))
    if name == "append":
        t = draw(st.integers(0, 40))
        shp = (FB, FH, t, FD)
        kw = {
            "positions": draw(int_likes(draw(st.sampled_from([(FB, t), (t,)])), 0, 200)),
            "protect": draw(bool_likes((FB, t))),
            "valid": draw(bool_likes((FB, t))),
            "bits": draw(int_likes((FB, t), 2, 16)),
        }
        return name, (layer, draw(tensor_likes(shp)), draw(tensor_likes(shp))), kw
    if name == "attend":
        tq = draw(st.integers(0, 3))
        q = draw(tensor_likes((FB, draw(st.sampled_from([FH, 2 * FH, 3])), tq, FD)))
        kw = {
            "window": draw(st.sampled_from([None, 0, 1, 7, -2])),
            "causal": draw(st.booleans()),
        }
        return name, (layer, q), kw
    if name == "truncate":
        return name, (draw(st.sampled_from([0, 5, 31, -1, [3, 4], [1], "x", 2**70])),), {}
    if name == "reorder":
        return name, (draw(st.sampled_from([[1, 0], [0, 0], [2, 0], [0], "ab", [-1, 0]])),), {}
    if name in ("dequantize", "page_buffers"):
        return name, (layer, draw(st.sampled_from([0, 1, 2, -1, None]))), {}
    if name == "seq_lens":
        return name, (layer,), {}
    if name == "max_tokens":
        return name, (draw(st.sampled_from([None, 0, 10, 60, 500, -4, "9"])),), {}
    return name, (), {}


def call(store: KVStore, name: str, args: tuple, kw: dict, tmp: str) -> KVStore:
    if name == "max_tokens":
        store.max_tokens = args[0]
    elif name == "save_load":
        store.save(os.path.join(tmp, "f.safetensors"))
        back = KVStore.load(os.path.join(tmp, "f.safetensors"))
        probe = torch.randn(FB, FH, 1, FD)
        assert_same_snapshot(snapshot(store, probe), snapshot(back, probe))
        assert back.max_tokens == store.max_tokens
        return back
    else:
        getattr(store, name)(*args, **kw)
    return store


@given(args=store_args(), seq=st.lists(calls(), min_size=1, max_size=8))
def test_fuzz_call_sequences(tmp_path_factory, args, seq):
    tmp = str(tmp_path_factory.mktemp("seq"))
    store = KVStore(2, FH, FD, batch_size=FB, **args)
    probe = torch.randn(FB, FH, 1, FD)
    for name, a, kw in seq:
        before = snapshot(store, probe)
        try:
            store = call(store, name, a, kw, tmp)
        except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
            if not isinstance(e, rotatekv.RotateKVError):
                raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
            assert_same_snapshot(before, snapshot(store, probe))


def test_racing_appends_are_serialized_whole(gen):
    """Appends from several threads to one layer each land whole: every token once, every
    thread's tokens in its own order, none torn."""
    n_threads, steps, d = 4, 25, 16
    store = KVStore(1, 2, d, batch_size=2, config=QuantConfig(bits=4, residual=5))
    data = [make_kv(gen, 2, 2, steps, d) for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        k, v = data[i]
        barrier.wait()
        try:
            for s in range(steps):
                pos = torch.full((2, 1), 1000 * i + s)
                store.append(0, k[:, :, s : s + 1], v[:, :, s : s + 1], positions=pos)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.seq_lens(0) == [n_threads * steps] * 2
    for b in range(2):
        pos, k, _ = store.dequantize(0, b)
        assert sorted(pos.tolist()) == sorted(
            1000 * i + s for i in range(n_threads) for s in range(steps)
        )
        # Each token's key is the one its thread appended (4-bit codes of that row).
        for i in range(n_threads):
            rows = [j for j, p in enumerate(pos.tolist()) if p // 1000 == i]
            assert [pos[j] % 1000 for j in rows] == sorted(pos[j] % 1000 for j in rows)
            ref = data[i][0][b].permute(1, 0, 2)  # [steps, H, D]
            err = (torch.from_numpy(k[rows]) - ref).abs().max().item()
            assert err < 0.35 * ref.abs().max().item(), err
