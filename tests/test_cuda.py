"""The CUDA backend.

Everywhere (CI included): every kernel compiles with NVRTC for sm_80 and sm_90 without
spills; the CUDA-absent errors; and device stores on ``device="emu"`` (the kernels' host
build, driven through the same device code path as a GPU) against CPU stores.
On a GPU (``pytest -m cuda``): the same comparisons with ``device="cuda"``, a float64
reference, and transformers generation.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import rotatekv
import rotatekv.cuda as rc
from rotatekv import KVStore, QuantConfig, RotationPlan

GPU = rc.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU with a CUDA driver")


def nvrtc_present() -> bool:
    try:
        rc.nvrtc_version()
    except rotatekv.DeviceError:
        return False
    return True


needs_nvrtc = pytest.mark.skipif(not nvrtc_present(), reason="NVRTC not installed (torch cu13)")


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_without_spills(arch: str) -> None:
    ptx = rc.compile_kernels(arch)
    logs = rc.compile_kernels(arch, log=True)
    assert set(ptx) == {"hadamard.cu", "quant.cu", "attend.cu", "saliency.cu"}
    entries = set()
    for name, text in ptx.items():
        assert f".target {arch}" in text, name
        entries |= set(re.findall(r"\.entry (\w+)", text))
        log = logs[name]
        stats = re.findall(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log
        )
        assert stats, log
        for frame, st, ld in stats:
            # No register spills anywhere. Stack: only the 28-entry column of the Paley
            # transforms (fwht) and sincosf's slow-path reduction (attend, paged write),
            # both small.
            assert (int(st), int(ld)) == (0, 0), f"{name}: {log}"
            assert int(frame) <= 128, f"{name}: {log}"
    assert entries == {
        "rkv_fwht", "rkv_append", "rkv_paged_write", "rkv_channel_keys", "rkv_attend",
        "rkv_combine", "rkv_mass_lse", "rkv_mass_keys",
    }  # fmt: skip


@needs_nvrtc
def test_bad_arch_is_refused() -> None:
    with pytest.raises(rotatekv.ArgumentError, match="arch"):
        rc.compile_kernels("volta")


@pytest.mark.skipif(GPU, reason="checks the errors of a machine without CUDA")
def test_cuda_request_without_cuda_raises_a_clear_error() -> None:
    assert rc.device_count() == 0 and not rc.is_available()
    with pytest.raises(rotatekv.DeviceError, match="CUDA driver"):
        KVStore(1, 1, 32, device="cuda")
    with pytest.raises(rotatekv.DeviceError, match="CUDA driver"):
        KVStore(1, 1, 32).to("cuda:0")
    # The CPU path keeps working.
    s = KVStore(1, 1, 32)
    s.append(0, torch.randn(1, 1, 3, 32), torch.randn(1, 1, 3, 32))
    assert s.seq_lens(0) == [3]


def test_unknown_device_is_refused() -> None:
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(rotatekv.DeviceError, match="device"):
            KVStore(1, 1, 32, device=bad)


# ---------------------------------------------------------------------------------------
# Device stores against CPU stores. `dev` is "emu" here and "cuda" under -m cuda.

CONFIGS = [
    ("pre_rope", dict(bits=2, residual=8), {}),
    ("pre_rope", dict(bits=3, group_size=32), {}),
    ("post_rope", dict(bits=4, residual=4, page_tokens=32), {}),
    ("none", dict(bits=8), {}),
    ("post_rope", dict(bits=2, key_layout="per_channel", residual=16), {"rotate_values": False}),
    ("pre_rope", dict(bits=16), {}),
    ("pre_rope", dict(bits=2, fp_format="bfloat16"), {"mixed": True}),
]


def make_pair(mode: str, cfg: dict, dev: str, seed: int, extra: dict | None = None):
    heads, d = 2, 64
    rv = (extra or {}).get("rotate_values", True)
    plan = (
        RotationPlan.hadamard(2, heads, d, mode=mode, rotate_values=rv) if mode != "none" else None
    )
    inv = (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).tolist()
    kw = dict(
        batch_size=2, config=cfg, plan=plan, rope_inv_freq=inv if mode == "pre_rope" else None
    )
    return KVStore(2, heads, d, **kw), KVStore(2, heads, d, device=dev, **kw)


def fill(cpu: KVStore, other: KVStore, dev_t: str, g: torch.Generator, extra: dict) -> None:
    heads, d = cpu.num_kv_heads, cpu.head_dim
    for t in (21, 1, 40, 1):
        k = torch.randn(2, heads, t, d, generator=g).half().float()
        v = torch.randn(2, heads, t, d, generator=g).half().float()
        kw = {}
        if extra.get("mixed"):
            kw["bits"] = torch.tensor([[2, 4, 16, 8, 3][i % 5] for i in range(2 * t)]).reshape(2, t)
            kw["protect"] = (torch.arange(2 * t) % 7 == 0).reshape(2, t)
        for layer in range(2):
            cpu.append(layer, k, v, **kw)
            other.append(layer, k.to(dev_t), v.to(dev_t), **{a: b.to(dev_t) for a, b in kw.items()})


def same_pages(cpu: KVStore, other: KVStore) -> None:
    host = other.to("cpu")
    for layer in range(cpu.num_layers):
        for seq in range(cpu.batch_size):
            a, b = cpu.page_buffers(layer, seq), host.page_buffers(layer, seq)
            assert len(a) == len(b)
            for pa, pb in zip(a, b, strict=True):
                assert (pa.bits, pa.start, pa.length) == (pb.bits, pb.start, pb.length)
                if pa.start == 0:
                    assert np.array_equal(np.from_dlpack(pa), np.from_dlpack(pb)), (layer, seq)
            pos_a, ka, va = cpu.dequantize(layer, seq)
            pos_b, kb, vb = host.dequantize(layer, seq)
            assert np.array_equal(pos_a, pos_b)
            assert np.array_equal(ka, kb) and np.array_equal(va, vb)


def run_parity(dev: str, dev_t: str, mode: str, cfg: dict, extra: dict, seed: int) -> None:
    cpu, other = make_pair(mode, cfg, dev, seed, extra)
    assert other.device == (dev if dev != "cuda" else "cuda:0")
    g = torch.Generator().manual_seed(seed)
    fill(cpu, other, dev_t, g, extra)
    same_pages(cpu, other)
    assert cpu.nbytes == other.nbytes
    for tq, window in ((1, None), (5, 17)):
        q = torch.randn(2, 4, tq, 64, generator=g)
        for layer in range(2):
            want = cpu.attend(layer, q, window=window)
            for dtype, tol in (
                (torch.float32, 1e-4),
                (torch.float16, 2e-3),
                (torch.bfloat16, 2e-2),
            ):
                got = other.attend(layer, q.to(dtype).to(dev_t), window=window)
                assert got.dtype == dtype and got.device.type == torch.device(dev_t).type
                ref = (
                    cpu.attend(layer, q.to(dtype).float(), window=window)
                    if dtype != torch.float32
                    else want
                )
                err = (got.float().cpu() - ref).abs().max().item()
                assert err < tol, (mode, cfg, dtype, tq, err)
    # Each query's 3 newest keys masked, log-sum-exps returned (the transformers prefill).
    q = torch.randn(2, 4, 6, 64, generator=g)
    for layer in range(2):
        want, want_lse = cpu.attend(layer, q, lag=3, window=17, return_lse=True)
        got, lse = other.attend(layer, q.to(dev_t), lag=3, window=17, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 6)
        assert lse.device.type == torch.device(dev_t).type
        assert (got.cpu() - want).abs().max().item() < 1e-4
        torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    # Beam reorder (shared pages copied on write), one more token, truncate, save/load.
    idx = torch.tensor([1, 0])
    cpu.reorder(idx)
    other.reorder(idx.to(dev_t))
    k = torch.randn(2, 2, 1, 64, generator=g).half().float()
    for layer in range(2):
        cpu.append(layer, k, k)
        other.append(layer, k.to(dev_t), k.to(dev_t))
    cpu.truncate([30, 41])
    other.truncate([30, 41])
    same_pages(cpu, other)


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_emulated_device_store_matches_the_cpu_store(i: int) -> None:
    mode, cfg, extra = CONFIGS[i]
    run_parity("emu", "cpu", mode, cfg, extra, seed=1000 + i)


def test_device_store_round_trips_through_files_and_devices(tmp_path) -> None:
    cpu, emu = make_pair("pre_rope", dict(bits=2, residual=8), "emu", 0)
    fill(cpu, emu, "cpu", torch.Generator().manual_seed(5), {})
    emu.save(tmp_path / "s.rkv")
    back = KVStore.load(tmp_path / "s.rkv", device="emu")
    assert back.device == "emu"
    same_pages(cpu, back)
    same_pages(cpu, emu.to("emu"))
    assert KVStore.load(tmp_path / "s.rkv").device == "cpu"


def test_device_page_buffers_export_without_copies() -> None:
    _, emu = make_pair("post_rope", dict(bits=2), "emu", 0)
    emu.append(0, torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64))
    buf = emu.page_buffers(0, 0)[0]
    t = torch.from_dlpack(buf)
    assert t.numel() == buf.nbytes
    owners = buf.owners
    del t
    assert buf.owners == owners - 1


def test_device_store_bad_inputs_leave_it_unchanged() -> None:
    _, emu = make_pair("pre_rope", dict(bits=2, residual=4), "emu", 0)
    k = torch.randn(2, 2, 6, 64)
    emu.append(0, k, k)
    before = emu.to("cpu")
    bad = [
        ((np.zeros((2, 2, 1, 64), np.float32),) * 2, rotatekv.DTypeError),
        ((torch.zeros(2, 2, 1, 64, dtype=torch.int32),) * 2, rotatekv.DTypeError),
        ((torch.zeros(2, 3, 1, 64),) * 2, rotatekv.ShapeError),
        ((torch.zeros(2, 2, 1, 64), torch.zeros(2, 2, 2, 64)), rotatekv.ShapeError),
        ((torch.full((2, 2, 1, 64), float("nan")),) * 2, rotatekv.ArgumentError),
        ((torch.full((2, 2, 1, 64), 1e6),) * 2, rotatekv.ArgumentError),
    ]
    for (kk, vv), err in bad:
        with pytest.raises(err):
            emu.append(0, kk, vv)
    with pytest.raises(rotatekv.ArgumentError, match="layer"):
        emu.append(5, k, k)
    with pytest.raises(rotatekv.ShapeError, match="q"):
        emu.attend(0, torch.randn(2, 3, 1, 64))
    with pytest.raises(rotatekv.ArgumentError, match="q"):
        emu.attend(0, torch.full((2, 4, 1, 64), float("inf")))
    with pytest.raises(rotatekv.ShapeError, match="positions"):
        emu.append(0, k, k, positions=torch.arange(3))
    same_pages(before, emu)


def test_transformers_generation_through_the_emulated_device_store() -> None:
    pytest.importorskip("transformers")
    import rotatekv.hf as rh
    from test_hf import tiny

    m = tiny("llama")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=8, do_sample=False)
    outs = {}
    with torch.no_grad():
        for dev in ("cpu", "emu"):
            rh.enable(m, config=QuantConfig(bits=2, residual=4), device=dev)
            outs[dev] = m.generate(input_ids=ids, attention_mask=mask, **kw)
        rh.disable(m)
    assert torch.equal(outs["cpu"], outs["emu"])


# ---------------------------------------------------------------------------------------
# On a GPU.


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_cuda_store_matches_the_cpu_store(i: int) -> None:
    mode, cfg, extra = CONFIGS[i]
    run_parity("cuda", "cuda", mode, cfg, extra, seed=2000 + i)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("shape", [(1, 8, 4, 128, 4096), (4, 8, 4, 128, 1000), (3, 2, 3, 96, 777)])
def test_cuda_attention_matches_float64(shape) -> None:
    b, hkv, gqa, d, n = shape
    plan = RotationPlan.hadamard(1, hkv, d, mode="pre_rope")
    inv = (1.0 / 10000 ** (torch.arange(0, d, 2).double() / d)).float()
    s = KVStore(
        1,
        hkv,
        d,
        batch_size=b,
        config=dict(bits=16),
        plan=plan,
        rope_inv_freq=inv.tolist(),
        device="cuda",
    )
    g = torch.Generator().manual_seed(n)
    k = torch.randn(b, hkv, n, d, generator=g).half()
    v = torch.randn(b, hkv, n, d, generator=g).half()
    s.append(0, k.cuda(), v.cuda())
    q = torch.randn(b, hkv * gqa, 1, d, generator=g).half()
    got = s.attend(0, q.cuda()).double().cpu()
    pos = torch.arange(n).double()
    ang = pos[:, None] * inv.double()[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kd = k.double()
    kr = kd * cos + torch.cat([-kd[..., d // 2 :], kd[..., : d // 2]], -1) * sin
    kr = kr.repeat_interleave(gqa, 1)
    vr = v.double().repeat_interleave(gqa, 1)
    p = torch.softmax(q.double() @ kr.transpose(-1, -2) / d**0.5, -1)
    want = p @ vr
    assert (got - want).abs().max().item() < 2e-3


@pytest.mark.parametrize("n", [1, 8, 12, 96, 128, 160, 1024, 16384])
def test_emulated_hadamard_is_the_cpu_transform(n: int) -> None:
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    for inverse in (False, True):
        got = rc.hadamard(x, inverse=inverse, device="emu")
        want = torch.from_numpy(rotatekv.hadamard(x.numpy(), inverse=inverse))
        assert torch.equal(got, want)
    h = rc.hadamard(x.to(torch.bfloat16), device="emu")
    assert h.dtype == torch.bfloat16 and h.shape == x.shape
    with pytest.raises(rotatekv.ArgumentError, match="x"):
        rc.hadamard(torch.randn(2, 7), device="emu")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n", [12, 128, 1024, 16384])
def test_cuda_hadamard_is_the_cpu_transform(n: int) -> None:
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    got = rc.hadamard(x.cuda()).cpu()
    assert torch.equal(got, torch.from_numpy(rotatekv.hadamard(x.numpy())))


@pytest.mark.cuda
@needs_gpu
def test_transformers_generation_on_a_cuda_model() -> None:
    pytest.importorskip("transformers")
    import rotatekv.hf as rh
    from test_hf import tiny

    m = tiny("llama")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        # The 2-bit cache on the GPU model gives the CPU store's tokens.
        rh.enable(m, config=QuantConfig(bits=2, residual=4))
        on_cpu = m.generate(input_ids=ids, attention_mask=mask, **kw)
        m.cuda()
        on_gpu = m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kw)
        # 16 bits on the GPU: token-identical to the unmodified GPU model.
        rh.enable(m, config=QuantConfig(bits=16))
        g16 = m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kw)
        rh.disable(m)
        ref = m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kw)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(g16, ref)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("tk, window, lag", [(1, None, 0), (300, None, 32), (777, 100, 5)])
def test_attention_mass_on_the_gpu_matches_the_reference(tk: int, window, lag: int) -> None:
    from reference import attention_mass_reference
    from rotatekv.saliency import attention_mass

    g = torch.Generator().manual_seed(tk)
    b, hq, hkv, d, tq = 2, 9, 3, 64, min(tk, 257)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    kp = torch.arange(tk)[None].expand(b, tk)
    qp = kp[:, tk - tq :]
    valid = torch.rand(b, tk, generator=g) > 0.1
    prior = torch.randn(b, hq, tq, generator=g)
    kw = dict(window=window, lag=lag, k_valid=valid, prior_lse=prior, softcap=30.0)
    got = attention_mass(q.cuda(), k.cuda(), qp.cuda(), kp.cuda(), **kw)
    mass, count, lse = attention_mass_reference(q, k, qp, kp, **kw)
    np.testing.assert_array_equal(got.count.numpy(), count)
    np.testing.assert_allclose(got.mass.numpy(), mass, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.lse.numpy(), lse, rtol=1e-5, atol=1e-5)
