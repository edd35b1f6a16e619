"""The CUDA backend ``ROTATEKV`` without a GPU: its layer runs the CUDA kernels' host build
(``device="emu"``) over CPU tensors, driven step by step as vLLM's worker drives a layer
(metadata from its builder, ``do_kv_cache_update`` then ``forward``; prefill chunks, a mixed
batch, decode), and must write the same pool bytes and attend to the same outputs as the CPU
backend's layer. Inputs are fresh random draws; the seed is printed on failure. Runs in
``.venv-vllm`` (``make test-vllm``)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends import cpu_attn  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

import rotatekv.vllm as rkv_vllm  # noqa: E402
from rotatekv.vllm import cpu, cuda, layer  # noqa: E402

SEED = int(torch.randint(0, 2**31 - 1, ()).item())
DEVICE = "emu"  # the CUDA kernels' host build over CPU tensors
HQ, H, D, BS, LAYERS = 4, 2, 64, 32, 2


def fake_config(settings: dict[str, Any], dtype: torch.dtype) -> SimpleNamespace:
    from transformers import LlamaConfig

    hf = LlamaConfig(
        hidden_size=HQ * D,
        num_attention_heads=HQ,
        num_key_value_heads=H,
        num_hidden_layers=LAYERS,
        intermediate_size=64,
        vocab_size=32,
    )
    return SimpleNamespace(
        additional_config={"rotatekv": settings},
        cache_config=SimpleNamespace(block_size=BS),
        model_config=SimpleNamespace(dtype=dtype, hf_config=hf),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
    )


class Driver:
    """One process's layers of one backend, stepped through the same requests."""

    def __init__(self, impl_cls: type, cfg: SimpleNamespace, mp: pytest.MonkeyPatch) -> None:
        layer.Layer.model = None
        layer.Layer.cell_bytes = None
        for mod in (layer, cpu, cuda):
            mp.setattr(mod, "get_current_vllm_config_or_none", lambda: cfg)
        mp.setattr(cpu_attn, "get_current_vllm_config", lambda: cfg)
        self.forward_ctx = SimpleNamespace(attn_metadata=None)
        mp.setattr(layer, "get_forward_context", lambda: self.forward_ctx)
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        self.impls = [impl_cls(HQ, D, 0.125, H, None, None, "auto") for _ in self.names]
        for im in self.impls:
            if isinstance(im, cuda.RotateKVCudaImpl):
                im.kernel_device = DEVICE
        cell = layer.Layer.cell_bytes
        assert cell is not None
        self.caches = [torch.zeros(24, H, BS, cell, dtype=torch.uint8) for _ in self.names]
        self.builder = cuda.RotateKVMetadataBuilder(None, self.names, None, torch.device("cpu"))

    def step(
        self,
        qsl: list[int],
        lens: list[int],
        table: torch.Tensor,
        slots: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> list[torch.Tensor]:
        i32 = dict(dtype=torch.int32)
        qsl_t = torch.tensor(qsl, **i32)
        cam = CommonAttentionMetadata(
            query_start_loc=qsl_t,
            query_start_loc_cpu=qsl_t,
            seq_lens=torch.tensor(lens, **i32),
            num_reqs=len(lens),
            num_actual_tokens=qsl[-1],
            max_query_len=max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
            max_seq_len=max(lens),
            block_table_tensor=table,
            slot_mapping=slots,
        )
        meta = self.builder.build(0, cam)
        self.forward_ctx.attn_metadata = dict.fromkeys(self.names, meta)
        outs = []
        for li, (name, im, cache) in enumerate(
            zip(self.names, self.impls, self.caches, strict=True)
        ):
            lay = SimpleNamespace(layer_name=name)
            # Layers differ: each gets its own keys and values.
            kl, vl, ql = k[li], v[li], q[li]
            im.do_kv_cache_update(lay, kl, vl, cache, slots)
            out = torch.zeros(ql.shape[0], HQ * D, dtype=ql.dtype)
            im.forward(lay, ql, kl, vl, cache, meta, out)
            outs.append(out)
        return outs


def scenario(g: torch.Generator, dtype: torch.dtype) -> list[tuple]:
    """Three steps: two prefill chunks; a decode beside a new request's chunk and the second
    chunk of request 1; then decode of all three."""
    nblk = 8
    ids = torch.randperm(24, generator=g)[: 3 * nblk].view(3, nblk).to(torch.int32)
    done = [0, 0, 0]
    plan = [
        {0: 70, 1: 40},
        {0: 1, 1: 23, 2: 37},
        {0: 1, 1: 1, 2: 1},
    ]
    steps = []
    for sizes in plan:
        reqs = sorted(sizes)
        qsl, lens, slots = [0], [], []
        for b in reqs:
            pos = torch.arange(done[b], done[b] + sizes[b])
            slots.append(ids[b][pos // BS].long() * BS + pos % BS)
            done[b] += sizes[b]
            qsl.append(qsl[-1] + sizes[b])
            lens.append(done[b])
        t = qsl[-1]
        table = ids[reqs].contiguous()
        k = torch.randn(LAYERS, t, H, D, generator=g).to(dtype)
        v = torch.randn(LAYERS, t, H, D, generator=g).to(dtype)
        q = torch.randn(LAYERS, t, HQ, D, generator=g).to(dtype)
        steps.append((qsl, lens, table, torch.cat(slots), q, k, v))
    assert math.prod(done) > 0
    return steps


@pytest.mark.parametrize(
    "settings,dtype",
    [
        ({"bits": 2}, torch.float32),
        ({"bits": 2, "residual": 0}, torch.float32),
        ({"key_bits": 4, "value_bits": 2, "residual": 8}, torch.bfloat16),
        ({"bits": 16}, torch.bfloat16),
    ],
)
def test_cuda_layer_equals_the_cpu_layer(settings, dtype, monkeypatch):
    g = torch.Generator().manual_seed(SEED)
    steps = scenario(g, dtype)
    cfg = fake_config(settings, dtype)
    results = []
    for impl_cls in (cpu.RotateKVImpl, cuda.RotateKVCudaImpl):
        with monkeypatch.context() as mp:
            d = Driver(impl_cls, cfg, mp)
            results.append(([d.step(*s) for s in steps], d.caches))
    (want, want_pools), (got, got_pools) = results
    tol = 5e-5 if dtype == torch.float32 else 2e-2
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        for li in range(LAYERS):
            torch.testing.assert_close(
                a[li], b[li], atol=tol, rtol=tol, msg=f"seed {SEED}: step {i} layer {li}"
            )
    for li in range(LAYERS):
        assert torch.equal(got_pools[li], want_pools[li]), f"seed {SEED}: pool of layer {li}"


def test_the_cuda_backend_is_registered_and_checks_what_it_holds():
    rkv_vllm.register()
    rkv_vllm.register()  # idempotent: every vLLM process runs it
    backend = AttentionBackendEnum["ROTATEKV"].get_class()
    assert backend is cuda.RotateKVCudaBackend
    assert backend.get_name() == "ROTATEKV"
    assert backend.get_impl_cls() is cuda.RotateKVCudaImpl
    assert backend.supports_head_size(128) and not backend.supports_head_size(65)
    assert backend.supports_block_size(64) and not backend.supports_block_size(16)
    assert not backend.supports_kv_cache_dtype("fp8")
    assert backend.supports_compute_capability((9, 0))
    assert not backend.supports_compute_capability((7, 5))


def test_selecting_the_cuda_backend_without_settings_means_2_bits(monkeypatch):
    monkeypatch.delenv(rkv_vllm.ENV, raising=False)
    cfg = fake_config({}, torch.float32)
    cfg.additional_config = {}
    with monkeypatch.context() as mp:
        d = Driver(cuda.RotateKVCudaImpl, cfg, mp)
        assert d.impls[0].fmt.key_bits == 2 and d.impls[0].fmt.value_bits == 2
