"""Tensor interop: torch and numpy inputs of every accepted dtype, strided views, outputs of
q's type, zero-copy page buffers (DLPack), and concurrent readers."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import rotatekv
from reference import (
    as_torch,
    attend_reference,
    decode_page,
    default_inv_freq,
    fp_round,
    make_kv,
    page_layout,
    quantize_groups,
    quantize_per_channel,
    tokens,
    tolerance,
)
from rotatekv import KVStore, QuantConfig, RotationPlan

CONTAINERS = [
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("numpy", np.float32),
    ("numpy", np.float16),
]


def convert(x: torch.Tensor, container: str, dtype: object) -> object:
    if container == "torch":
        return x.to(dtype)
    return x.numpy().astype(dtype)


@pytest.mark.parametrize("container,dtype", CONTAINERS, ids=lambda x: str(x))
def test_inputs_of_every_accepted_type(gen, container, dtype):
    hkv, d, t, b = 2, 64, 37, 2
    store = KVStore(1, hkv, d, batch_size=b, config=QuantConfig(bits=4, group_size=32))
    k, v = make_kv(gen, b, hkv, t, d)
    kx, vx = convert(k, container, dtype), convert(v, container, dtype)
    store.append(0, kx, vx)
    for i in range(b):
        _, kd, vd = store.dequantize(0, i)
        kt = as_torch(kx).float()[i].permute(1, 0, 2)
        vt = as_torch(vx).float()[i].permute(1, 0, 2)
        np.testing.assert_array_equal(kd, quantize_groups(kt, 4, 32).deq.numpy())
        np.testing.assert_array_equal(vd, quantize_groups(vt, 4, 32).deq.numpy())
    q = convert(torch.randn(b, 2 * hkv, 3, d, generator=gen), container, dtype)
    out = store.attend(0, q)
    assert type(out) is type(q)
    assert out.dtype == q.dtype and out.shape == q.shape
    if container == "torch":
        assert out.device == q.device and out.is_contiguous()
    else:
        assert out.flags.c_contiguous
    want = attend_reference(store, 0, q, [[t - 3, t - 2, t - 1]] * b)
    got = as_torch(out)
    torch.testing.assert_close(got.double(), want, **tolerance(as_torch(q).dtype))


def test_mixed_input_dtypes_in_one_call(gen):
    store = KVStore(1, 2, 64, config=QuantConfig(bits=16))
    k, v = make_kv(gen, 1, 2, 5, 64)
    store.append(0, k.to(torch.bfloat16), v.numpy().astype(np.float16))
    _, kd, vd = store.dequantize(0, 0)
    np.testing.assert_array_equal(kd, fp_round(tokens(k.to(torch.bfloat16).float(), 0)).numpy())
    np.testing.assert_array_equal(vd, fp_round(tokens(v, 0)).numpy())


def strided_views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-contiguous views holding the same values as ``x`` ``[B, H, T, D]``."""
    b, h, t, d = x.shape
    bthd = x.permute(0, 2, 1, 3).contiguous()  # [B, T, H, D], a common model layout
    big = torch.zeros(b, h, 2 * t, 2 * d)
    big[:, :, ::2, ::2] = x
    return {
        "transpose": bthd.transpose(1, 2),
        "step-slice": big[:, :, ::2, ::2],
        "channels-last-of-4d": x.contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("view", ["transpose", "step-slice", "channels-last-of-4d"])
def test_non_contiguous_views_give_the_same_result(gen, view):
    hkv, d, t, b = 2, 64, 37, 2
    k, v = make_kv(gen, b, hkv, t, d)
    q = torch.randn(b, 2 * hkv, 2, d, generator=gen)
    plan = RotationPlan.hadamard(1, hkv, d, mode="pre_rope")
    cfg = QuantConfig(bits=2, residual=4)
    inv = default_inv_freq(d)
    ref = KVStore(1, hkv, d, batch_size=b, config=cfg, plan=plan, rope_inv_freq=inv)
    ref.append(0, k, v)
    store = KVStore(1, hkv, d, batch_size=b, config=cfg, plan=plan, rope_inv_freq=inv)
    kv, vv, qv = strided_views(k)[view], strided_views(v)[view], strided_views(q)[view]
    if view != "channels-last-of-4d":
        assert not kv.is_contiguous() and not qv.is_contiguous()
    assert torch.equal(kv, k) and torch.equal(qv, q)
    # Read in place: torch records no copy of the inputs (only q's output is allocated).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        store.append(0, kv, vv)
        out = store.attend(0, qv)
    ops = {e.name for e in prof.events()}
    assert not ops & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::to"}, ops
    for i in range(b):
        for x, y in zip(store.dequantize(0, i), ref.dequantize(0, i), strict=True):
            np.testing.assert_array_equal(x, y)
    assert out.is_contiguous() and out.shape == q.shape
    assert torch.equal(out, ref.attend(0, q))
    # Numpy views too.
    store.clear()
    store.append(0, kv.numpy(), vv.numpy())
    assert torch.equal(torch.from_numpy(store.attend(0, qv.numpy())), ref.attend(0, q))


def test_stride_zero_broadcast_views(gen):
    """Expanded tensors (stride 0) are read in place."""
    hkv, d, t = 2, 64, 65
    one_k, one_v = make_kv(gen, 1, hkv, 1, d)
    k, v = one_k.expand(2, hkv, t, d), one_v.expand(2, hkv, t, d)
    assert k.stride()[0] == 0 and k.stride()[2] == 0
    store = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=8))
    store.append(0, k, v)
    ref = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=8))
    ref.append(0, k.contiguous(), v.contiguous())
    q = torch.randn(1, hkv, 1, d, generator=gen).expand(2, hkv, 4, d)
    assert torch.equal(store.attend(0, q), ref.attend(0, q.contiguous()))
    for i in range(2):
        np.testing.assert_array_equal(store.dequantize(0, i)[1], ref.dequantize(0, i)[1])


def test_requires_grad_tensors(gen):
    store = KVStore(1, 2, 64, config=QuantConfig(bits=4))
    k, v = make_kv(gen, 1, 2, 9, 64)
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    store.append(0, kg, vg)
    q = torch.randn(1, 4, 1, 64, generator=gen, requires_grad=True)
    out = store.attend(0, q)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.requires_grad
    ref = KVStore(1, 2, 64, config=QuantConfig(bits=4))
    ref.append(0, k, v)
    assert torch.equal(out, ref.attend(0, q.detach()))
    # A Parameter (a torch subclass with grad) works as well.
    p = torch.nn.Parameter(q.detach().clone())
    assert torch.equal(store.attend(0, p), out)


def test_big_endian_numpy_input_is_read_correctly_or_rejected(gen):
    store = KVStore(1, 1, 64, config=QuantConfig(bits=16))
    k = np.full((1, 1, 3, 64), 1.0, dtype=">f4")
    try:
        store.append(0, k, k)
    except rotatekv.DTypeError:
        return
    np.testing.assert_array_equal(store.dequantize(0, 0)[1], np.ones((3, 1, 64), np.float32))


# ============================================================================================
# Page buffers (DLPack, zero copy)
# ============================================================================================


def test_page_buffers_are_zero_copy_and_outlive_the_store(gen):
    hkv, d = 2, 64
    store = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2))
    k, v = make_kv(gen, 2, hkv, 70, d)
    store.append(0, k, v, positions=torch.arange(70) * 3 + 5)
    bufs = store.page_buffers(0, 1)
    assert [(b.bits, b.capacity, b.start, b.length, b.window) for b in bufs] == [
        (2, 64, 0, 64, False),
        (2, 64, 0, 6, False),
    ]
    assert bufs[0].__dlpack_device__() == (1, 0)
    t0 = torch.from_dlpack(bufs[0])
    assert t0.dtype == torch.uint8 and t0.shape == (bufs[0].nbytes,) and t0.device.type == "cpu"
    # Zero copy: every export of a page is the same memory, for torch and numpy alike.
    assert torch.from_dlpack(bufs[0]).data_ptr() == t0.data_ptr()
    a0 = np.from_dlpack(bufs[0])
    assert a0.__array_interface__["data"][0] == t0.data_ptr()
    # Positions are int32 at offset 0.
    pos = t0[: 4 * 64].view(torch.int32)
    np.testing.assert_array_equal(pos.numpy(), np.arange(64) * 3 + 5)
    t1 = torch.from_dlpack(bufs[1])
    np.testing.assert_array_equal(t1[: 4 * 6].view(torch.int32).numpy(), np.arange(64, 70) * 3 + 5)
    snap0, snap1 = t0.clone(), t1.clone()
    # A later append goes into the partly filled page (copy on write): the exported bytes
    # stay as they were and stay readable.
    k1, v1 = make_kv(gen, 2, hkv, 1, d)
    store.append(0, k1, v1)
    assert store.seq_lens(0) == [71, 71]
    assert torch.equal(t1, snap1)
    new = store.page_buffers(0, 1)
    assert new[1].length == 7
    assert torch.from_dlpack(new[1])[4 * 6 : 4 * 7].view(torch.int32).item() == 69 * 3 + 5 + 1
    # The buffers outlive the store.
    del store, bufs, new
    gc.collect()
    assert torch.equal(t0, snap0) and torch.equal(t1, snap1)
    assert int(a0[:4].view(np.int32)[0]) == 5


def test_page_buffer_refuses_to_copy():
    store = KVStore(1, 1, 64)
    store.append(0, torch.ones(1, 1, 1, 64), torch.ones(1, 1, 1, 64))
    buf = store.page_buffers(0, 0)[0]
    with pytest.raises(rotatekv.ArgumentError, match="copy"):
        buf.__dlpack__(copy=True)
    with pytest.raises(rotatekv.ArgumentError, match="seq"):
        store.page_buffers(0, 1)
    with pytest.raises(rotatekv.ArgumentError, match="layer"):
        store.page_buffers(1, 0)


@pytest.mark.parametrize(
    "bits,group,per_channel,fp_format",
    [
        (2, 64, False, "float16"),
        (3, 32, False, "float16"),
        (4, 16, False, "float16"),
        (8, 64, False, "float16"),
        (2, 32, True, "float16"),
        (16, 64, False, "bfloat16"),
    ],
)
def test_page_bytes_follow_the_documented_layout(gen, bits, group, per_channel, fp_format):
    """Decodes raw page bytes with the documented layout and packing, and checks codes,
    scales, zeros and positions against the reference quantizer (identity plan)."""
    hkv, d = 3, 64
    layout = "per_channel" if per_channel else "per_token"
    cfg = QuantConfig(bits=bits, group_size=group, key_layout=layout, fp_format=fp_format)
    store = KVStore(1, hkv, d, config=cfg)
    t = 75
    k, v = make_kv(gen, 1, hkv, t, d)
    store.append(0, k, v)
    cap = store.config["page_tokens"]
    kt, vt = tokens(k, 0), tokens(v, 0)
    if per_channel:  # per-channel keys are quantized from their 16-bit copy, by page
        kt, vt = fp_round(kt), fp_round(vt)
    seen = 0
    for buf in store.page_buffers(0, 0):
        lay = page_layout(buf.bits, per_channel, cap, hkv, d, group)
        raw = torch.from_dlpack(buf).numpy()
        page = decode_page(raw, lay, fp_format)
        live = slice(buf.start, buf.length)
        pos = page.positions[live]
        assert (page.tags[live] == buf.bits).all() or buf.window
        kw, vw = kt[pos], vt[pos]
        if buf.bits == 16:
            np.testing.assert_array_equal(page.keys[live], fp_round(kw, fp_format).numpy())
            np.testing.assert_array_equal(page.values[live], fp_round(vw, fp_format).numpy())
        else:
            rk = quantize_per_channel(kw, bits) if per_channel else quantize_groups(kw, bits, group)
            rv = quantize_groups(vw, bits, group)
            np.testing.assert_array_equal(page.key_codes[live], rk.codes.numpy())
            np.testing.assert_array_equal(page.value_codes[live], rv.codes.numpy())
            np.testing.assert_array_equal(page.keys[live], rk.deq.numpy())
            np.testing.assert_array_equal(page.values[live], rv.deq.numpy())
            assert page.key_codes.max() <= 2**bits - 1
        seen += len(pos)
    assert seen == t
    # The decoded pages are what dequantize returns (page by page, window last).
    decoded = [
        decode_page(
            torch.from_dlpack(b).numpy(),
            page_layout(b.bits, per_channel, cap, hkv, d, group),
            fp_format,
        )
        for b in store.page_buffers(0, 0)
    ]
    bufs = store.page_buffers(0, 0)
    pos = np.concatenate(
        [p.positions[b.start : b.length] for p, b in zip(decoded, bufs, strict=True)]
    )
    keys = np.concatenate([p.keys[b.start : b.length] for p, b in zip(decoded, bufs, strict=True)])
    dpos, dk, _ = store.dequantize(0, 0)
    np.testing.assert_array_equal(pos, dpos)
    np.testing.assert_array_equal(keys, dk)


# ============================================================================================
# Threads
# ============================================================================================


def test_concurrent_attend_calls_match_sequential_ones(gen):
    hkv, d, b = 2, 128, 2
    plan = RotationPlan.hadamard(2, hkv, d, mode="pre_rope")
    store = KVStore(
        2,
        hkv,
        d,
        batch_size=b,
        config=QuantConfig(bits=2, residual=16),
        plan=plan,
        rope_inv_freq=default_inv_freq(d),
    )
    k, v = make_kv(gen, b, hkv, 300, d)
    for layer in range(2):
        store.append(layer, k, v)
    queries = [torch.randn(b, 4 * hkv, 1 + i % 3, d, generator=gen) for i in range(16)]
    sequential = [store.attend(i % 2, q) for i, q in enumerate(queries)]
    barrier = threading.Barrier(4)

    def work(i: int) -> torch.Tensor:
        if i < 4:
            barrier.wait(timeout=60)
        return store.attend(i % 2, queries[i])

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(work, range(len(queries))))
    for a, c in zip(sequential, concurrent, strict=True):
        assert torch.equal(a, c)
    # Different queries give different outputs (the comparison has power).
    assert not torch.equal(sequential[0], sequential[2][:, :, :1])


def test_attend_during_appends_sees_whole_appends(gen):
    """Readers and a writer on one store: each read sees a consistent store (a whole number
    of appends), and the final state matches a sequential run."""
    hkv, d = 1, 64
    store = KVStore(1, hkv, d, config=QuantConfig(bits=4))
    ref = KVStore(1, hkv, d, config=QuantConfig(bits=4))
    chunks = [make_kv(gen, 1, hkv, 8, d) for _ in range(20)]
    q = torch.randn(1, hkv, 1, d, generator=gen)
    lens: list[int] = []

    def writer() -> None:
        for k, v in chunks:
            store.append(0, k, v)

    def reader() -> None:
        for _ in range(50):
            lens.append(store.seq_lens(0)[0])
            store.attend(0, q, positions=[10**6])

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(n % 8 == 0 for n in lens)
    for k, v in chunks:
        ref.append(0, k, v)
    assert torch.equal(store.attend(0, q), ref.attend(0, q))


# ============================================================================================
# SIMD levels
# ============================================================================================

SIMD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import rotatekv
import test_store

level = rotatekv.build_info()["simd"]
if level != {level!r}:
    print("unavailable", level)
    raise SystemExit(0)
cases = [
    dict(seed=1, d=64, hkv=2, gqa=2, batch=2, chunks=[65, 1], mode="pre_rope", group_heads=2),
    dict(seed=2, d=128, hkv=1, gqa=8, batch=1, chunks=[37], tq=3, bits=3, window=9),
    dict(seed=3, d=64, hkv=4, gqa=1, batch=3, chunks=[130], key_layout="per_channel", bits=4),
    dict(seed=4, d=256, hkv=2, gqa=3, batch=2, chunks=[3, 70], mode="identity", softcap=4.0),
    dict(seed=5, d=64, hkv=2, gqa=4, batch=2, chunks=[40], mixed_bits=True, protect=True,
         residual=5, q_dtype=test_store.torch.bfloat16),
]
for case in cases:
    test_store.build_and_check(**case)
test_store.test_identity_store_dequantizes_exactly_to_the_reference(
    test_store.torch.Generator().manual_seed(0), 3, 128, 32)
print("ok", level)
"""


@pytest.mark.parametrize("level", ["scalar", "avx2"])
def test_lower_simd_levels_match_the_reference(level):
    """ROTATEKV_SIMD lowers the kernels' instruction set; every level must agree with the
    reference (the default level is what the rest of the suite runs)."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ROTATEKV_SIMD=level)
    res = subprocess.run(
        [sys.executable, "-c", SIMD_SCRIPT.format(tests=tests, level=level)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    if res.stdout.startswith("unavailable"):
        pytest.skip(f"this CPU does not run {level}: {res.stdout.strip()}")
    assert res.stdout.strip() == f"ok {level}"


def test_long_calls_release_the_gil(gen):
    """A pure-Python thread keeps running while append and attend work: its progress during
    a call is a sizeable fraction of what it makes in the same time while the main thread
    sleeps (holding the GIL, it would only get the switch intervals around the call)."""
    import sys
    import time

    store = KVStore(1, 8, 128, config=QuantConfig(bits=2))
    k, v = make_kv(gen, 1, 8, 4096, 128)
    q = torch.randn(1, 32, 64, 128, generator=gen)
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    th = threading.Thread(target=spin)
    th.start()
    try:
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.05)
        rate = (count[0] - c0) / (time.perf_counter() - t0)
        shares = []
        for call in (lambda: store.append(0, k, v), lambda: store.attend(0, q)):
            c0, t0 = count[0], time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            shares.append((count[0] - c0) / (rate * elapsed))
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(old)
    assert all(share > 0.1 for share in shares), shares
