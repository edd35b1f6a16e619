"""Calibration, sinks, text windows and the evaluation harness, on tiny random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import rotatekv  # noqa: E402
import rotatekv.hf as rh  # noqa: E402
from rotatekv import KVStore, QuantConfig, RotationPlan  # noqa: E402
from rotatekv import calibrate as C  # noqa: E402
from rotatekv.tools import eval as E  # noqa: E402
from rotatekv.tools import text as T  # noqa: E402
from test_hf import tiny  # noqa: E402


def ids(w: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (w, t), generator=g)


@pytest.fixture(scope="module")
def llama_data():
    m = tiny("llama")
    data = C.collect(m, ids(3, 40), n_queries=16, progress=False)
    return m, data


def test_collect_shapes_and_unroped_keys(llama_data) -> None:
    m, data = llama_data
    assert len(data) == 2
    ld = data[0]
    assert ld.k_pre.shape == ld.k_post.shape == ld.v.shape == (3, 2, 40, 16)
    assert ld.q.shape == (3, 4, 16, 16)
    assert ld.maxabs.shape == (3, 40) and (ld.maxabs > 0).all()
    assert torch.equal(ld.positions[0], torch.arange(40))
    assert ld.scale == pytest.approx(16**-0.5)
    # Pre-RoPE keys are the k_proj output (no per-head norm in Llama).
    x = m.model.embed_tokens(ids(3, 40)[:1])
    x = m.model.layers[0].input_layernorm(x)
    k = m.model.layers[0].self_attn.k_proj(x).view(1, 40, 2, 16).transpose(1, 2)
    assert torch.allclose(ld.k_pre[:1], k, atol=1e-5)


def test_fake_quant_matches_the_store() -> None:
    """The fake quantizer calibration scores permutations with is the store's format."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 70, 16, generator=g) * 3
    for bits, clip in ((2, 1.0), (2, 0.8), (4, 0.9)):
        st = KVStore(
            1,
            2,
            16,
            config=QuantConfig(bits=bits, key_clip=clip),
            plan=RotationPlan.identity(1, 2, 16),
        )
        st.append(0, k, k)
        _, ks, _ = st.dequantize(0, 0)
        want = C.fake_quant(k[0].permute(1, 0, 2), bits, 16, clip)
        assert np.allclose(ks, want.numpy(), atol=1e-5), (bits, clip)


def test_fit_builds_a_valid_plan_and_search_lowers_attention_error(llama_data) -> None:
    m, data = llama_data
    spec = rh.model_spec(m)
    cal = C.fit(data, spec, bits=2, clip="search", progress=False)
    plan = cal.plan
    assert plan.mode == "pre_rope" and plan.group_heads == 2
    for row in plan.key_perm:
        assert sorted(row.tolist()) == list(range(32))
    assert all(min(abs(c - x) for x in C.CLIPS) < 1e-6 for c in plan.key_clip + plan.value_clip)
    for e in cal.report:
        assert e["reorder"] in C.REORDERS
        assert e["key_error"][e["reorder"]] == min(e["key_error"].values())
    # The searched clips beat (or tie) the fixed 0.8 on the data they were fitted to.
    one = RotationPlan(1, 2, 16, mode="pre_rope", group_heads=2, key_perm=plan.key_perm[:1])
    cfg = QuantConfig(bits=2)
    e_fit = C._attention_error(
        data[0], spec, spec.ropes[0], one,
        cfg.replace(key_clip=plan.key_clip[0], value_clip=plan.value_clip[0]), None, data[0].scale,
    )  # fmt: skip
    e_fix = C._attention_error(
        data[0], spec, spec.ropes[0], one, cfg.replace(key_clip=0.8, value_clip=0.8), None,
        data[0].scale,
    )  # fmt: skip
    assert e_fit <= e_fix + 1e-9


def test_calibration_file_round_trip_and_shape_check(tmp_path, llama_data) -> None:
    m, data = llama_data
    cal = C.fit(data, rh.model_spec(m), clip="fixed", progress=False)
    cal.sink_thresholds = [math.inf, 7.5]
    p = tmp_path / "cal.safetensors"
    cal.save(p)
    back = C.Calibration.load(p, m)
    assert back.sink_thresholds == [math.inf, 7.5]
    assert np.array_equal(back.plan.key_perm, cal.plan.key_perm)
    assert back.settings["model_shape"] == [2, 2, 16]
    spec = rh.model_spec(m)
    other = rh.ModelSpec(3, 2, 16, spec.ropes + spec.ropes[:1], (False,) * 3)
    with pytest.raises(rotatekv.FormatError, match="made for num_layers = 2, not 3"):
        C.Calibration.load(p, other)
    RotationPlan.hadamard(2, 2, 16).save(tmp_path / "plain.safetensors")
    with pytest.raises(rotatekv.FormatError, match="without calibration data"):
        C.Calibration.load(tmp_path / "plain.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(rotatekv.RotateKVError):
        C.Calibration.load(tmp_path / "bad.safetensors")


def test_sink_rule_protects_tokens_inside_the_hf_path() -> None:
    """Threshold 0 protects every token: the 2-bit store then behaves as a 16-bit one."""
    m = tiny("qwen3")
    spec = rh.model_spec(m)
    x = ids(1, 20)
    plan = RotationPlan.hadamard(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    with torch.no_grad():
        rh.enable(m, plan, QuantConfig(bits=16))
        ref = m(input_ids=x).logits
        cal = C.Calibration(plan, [0.0] * spec.num_layers)
        rh.enable(m, cal, QuantConfig(bits=2))
        cache = rh.new_cache(m)
        out = m(input_ids=x, cache=cache).logits
        none = C.Calibration(plan, [math.inf] * spec.num_layers)
        rh.enable(m, none, QuantConfig(bits=2))
        q = m(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5)
    assert cache.bits_per_element() > 16
    assert not torch.allclose(q, ref, atol=1e-3)


def test_sink_threshold_rule() -> None:
    ma = torch.ones(4, 100)
    assert math.isinf(C.sink_threshold(ma, 20.0, 0.02))  # nothing massive
    ma[:, 0] = 1000.0
    assert C.sink_threshold(ma, 20.0, 0.02) == pytest.approx(20.0)
    ma[:, :10] = 1000.0  # 10% of tokens: not a sink pattern
    assert math.isinf(C.sink_threshold(ma, 20.0, 0.02))


class _Tok:
    """A character tokenizer with the parts of the transformers API text.py uses."""

    add_bos_token = False
    bos_token_id = 1
    unk_token_id = 0
    unk_token = "<|endoftext|>"

    def convert_tokens_to_ids(self, t: str) -> int:
        return 0 if t == "<|endoftext|>" else 0

    def __call__(self, s: str, add_special_tokens: bool = False):
        class R:
            input_ids = [3 + (ord(c) % 100) for c in s]

        return R()


def test_windows_are_disjoint_and_start_at_a_boundary(tmp_path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 30 + "\n\n\n\n" + "klmnopqrst" * 30, encoding="utf-8")
    docs = T.load_texts(f)
    assert len(docs) == 2
    ev, ca = T.split_windows(_Tok(), docs, 3, 2, 50)
    assert ev.shape == (3, 50) and ca.shape == (2, 50)
    assert (ev[:, 0] == 0).all() and (ca[:, 0] == 0).all()
    stream = T.token_stream(_Tok(), docs)
    n = stream.numel()
    # Evaluation windows come from the front, calibration windows from the back.
    assert torch.equal(ev[0, 1:], stream[1:50])
    assert torch.equal(ca[0, 1:], stream[n - 49 : n])
    with pytest.raises(rotatekv.ArgumentError, match="need"):
        T.split_windows(_Tok(), docs, 30, 30, 50)
    with pytest.raises(rotatekv.ArgumentError, match="UTF-8"):
        (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa")
        T.load_texts(tmp_path / "b.txt")


def test_evaluate_rows_and_json(tmp_path) -> None:
    m = tiny("llama")
    w = ids(2, 96, seed=5)  # KIVI quantizes full 32-token blocks past its 32 recent
    rows = E.evaluate(
        m, w, E.parse_methods("rtn2,kivi2,rotatekv2"), ["fake", "decode"], calib=ids(2, 96, 9),
        progress=False, log=lambda s: None,
    )  # fmt: skip
    assert [(r["method"], r["protocol"]) for r in rows] == [
        (n, p) for p in ("fake", "decode") for n in ("fp16", "rtn2", "kivi2", "rotatekv2")
    ]
    fp = {r["protocol"]: r for r in rows if r["method"] == "fp16"}
    # The two protocols agree for a 16-bit cache: same model, same tokens.
    assert fp["fake"]["ppl"] == pytest.approx(fp["decode"]["ppl"], rel=1e-3)
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["kv_bytes"] > 0
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - fp[r["protocol"]]["ppl"])
        if r["method"] == "fp16":
            assert r["kl"] == 0.0 and r["effective_bits"] > 16
        else:
            assert r["kl"] > 0 and r["effective_bits"] < 16
    out = tmp_path / "r.json"
    E.write_json(out, "tiny", "random", w, rows)
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "text", "windows", "window_len", "results"}
    assert set(doc["results"][0]) == {
        "method", "protocol", "bits", "effective_bits", "settled_bits", "kv_bytes", "ppl",
        "delta_ppl", "kl", "seconds",
    }  # fmt: skip
    assert "| rtn2 | fake |" in E.table(rows)


def test_policy_methods_meet_rotatekv2s_budget() -> None:
    """akvq and saliency reuse rotatekv2's calibration and, by default, spend its settled
    effective bits on the same windows; --budget overrides it."""
    assert E.parse_methods("akvq,kivi2") == ["fp16", "rotatekv2", "akvq", "kivi2"]
    assert E.parse_methods("saliency,rotatekv2")[:2] == ["fp16", "rotatekv2"]
    m = tiny("llama")
    w = ids(2, 64, seed=5)
    quiet = dict(progress=False, log=lambda s: None)
    rows = E.evaluate(
        m, w, E.parse_methods("akvq,saliency,akvq-flat"), ["fake", "decode"],
        calib=ids(2, 64, 9), **quiet,
    )  # fmt: skip
    by = {(r["method"], r["protocol"]): r for r in rows}
    for proto in ("fake", "decode"):
        ref = by["rotatekv2", proto]["settled_bits"]
        for name in ("akvq", "saliency", "akvq-flat"):
            r = by[name, proto]
            # Within one 1-bit step over a layer's 64 tokens, never above.
            assert ref - 1.0 / 64 <= r["settled_bits"] <= ref + 1e-9, (name, proto)
            assert math.isfinite(r["ppl"]) and r["kl"] > 0
    rows = E.evaluate(
        m, w[:1], ["fp16", "rotatekv2", "saliency"], ["fake"], calib=ids(2, 64, 9),
        budget=6.0, **quiet,
    )  # fmt: skip
    assert rows[-1]["settled_bits"] == pytest.approx(6.0, abs=1.0 / 64)
    with pytest.raises(rotatekv.ArgumentError, match="budget"):
        E.evaluate(
            m, w[:1], ["fp16", "rotatekv2", "akvq"], ["fake"], calib=ids(2, 64, 9),
            budget=1.0, **quiet,
        )  # fmt: skip


def test_method_names_are_checked() -> None:
    with pytest.raises(rotatekv.ArgumentError, match="methods"):
        E.parse_methods("fp16,kivi3")
    assert E.parse_methods("kivi2")[0] == "fp16"
    m = tiny("llama")
    with pytest.raises(rotatekv.ArgumentError, match="calibration"):
        E.evaluate(m, ids(1, 8), ["fp16", "rotatekv2"], ["fake"], calib=None, progress=False)


def test_cli_rejects_bad_numbers() -> None:
    from rotatekv.tools.cli import main

    with pytest.raises(SystemExit, match="windows"):
        main(["eval", "--windows", "0"])


def test_key_layout_choice_reaches_the_stores(tmp_path, llama_data) -> None:
    """Calibration may give layers different key layouts; the cache then holds one store per
    layout, each attending with its own layout, and the choice survives save/load."""
    m, data = llama_data
    spec = rh.model_spec(m)
    cal = C.fit(data, spec, clip="fixed", key_layout="auto", layout_margin=1e9, progress=False)
    assert cal.key_layouts == ["per_channel", "per_channel"]  # margin forces per-channel
    for e in cal.report:
        assert set(e["layout_error"]) == {"per_token", "per_channel"}
    cal.key_layouts = ["per_token", "per_channel"]
    cal.save(tmp_path / "c.safetensors")
    back = C.Calibration.load(tmp_path / "c.safetensors", m)
    assert back.key_layouts == ["per_token", "per_channel"]
    x = ids(1, 70)
    with torch.no_grad():
        rh.enable(m, back, QuantConfig(bits=4))
        cache = rh.new_cache(m)
        out = m(input_ids=x, cache=cache).logits
        rh.enable(m, back.plan, QuantConfig(bits=4))
        same = m(input_ids=x).logits
        rh.disable(m)
    assert len(cache.stores) == 2
    s0, _ = cache.store_of(0)
    s1, _ = cache.store_of(1)
    assert s0 is not s1
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, same, atol=1e-6)  # layer 1 really used per-channel keys
    with pytest.raises(rotatekv.ArgumentError, match="key_layout"):
        C.fit(data, spec, key_layout="diagonal", progress=False)


def test_layout_choice_follows_the_keys() -> None:
    """Large per-channel key offsets (Qwen2's k_proj bias, made large and varied) survive
    rotation as one fixed pattern on every token: per-token groups spend their range on it,
    per-channel scales absorb it. Calibration must pick per-channel for that layer only."""
    m = tiny("qwen2")
    with torch.no_grad():
        b = m.model.layers[1].self_attn.k_proj.bias
        b.copy_(40.0 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0)))
    data = C.collect(m, ids(3, 64, seed=4), n_queries=16, progress=False)
    cal = C.fit(data, rh.model_spec(m), bits=2, clip="fixed", key_layout="auto", progress=False)
    assert cal.key_layouts == ["per_token", "per_channel"], cal.report


def test_choose_layouts_takes_the_lower_loss(monkeypatch, llama_data) -> None:
    """Per-channel keys everywhere (a fit with clips searched for them) replace the fitted
    layouts only when the model's loss says so by the margin; the losses are recorded."""
    m, data = llama_data
    args = dict(clip="search", key_layout="auto")
    cal = C.fit(data, rh.model_spec(m), progress=False, **args)
    assert cal.key_layouts == ["per_token", "per_token"]
    cfg = QuantConfig(bits=2)
    for fitted, channel, want in [(3.0, 2.0, "per_channel"), (3.0, 2.995, "fitted")]:
        seen = []

        def nll(model, c, windows, config, fitted=fitted, channel=channel, seen=seen):
            seen.append(c)
            return channel if c.key_layouts == ["per_channel"] * 2 else fitted

        monkeypatch.setattr(C, "_nll", nll)
        got = C.choose_layouts(m, cal, data, ids(1, 40), cfg, **args)
        assert got.settings["layout_nll"] == {"fitted": fitted, "per_channel": channel,
                                              "chosen": want}  # fmt: skip
        assert seen[0] is cal and seen[1].key_layouts == ["per_channel"] * 2
        if want == "fitted":
            assert got.plan is cal.plan and got.key_layouts == cal.key_layouts
        else:
            # The per-channel candidate's own fit: clips searched with per-channel keys.
            assert got.plan is seen[1].plan and got.key_layouts == ["per_channel"] * 2
            assert [e["key_layout"] for e in got.report] == ["per_channel"] * 2
    assert cal.key_layouts == ["per_token", "per_token"] and "layout_nll" not in cal.settings


def test_gemma3_calibration_takes_per_channel_keys() -> None:
    """Gemma 3 270M (real weights): its QK-normed keys carry most of their energy in a
    constant offset, which per-token groups cannot hold at 2 bits. The per-layer proxy keeps
    some layers per-token; the measured loss takes per-channel keys everywhere."""
    pytest.importorskip("gguf")
    from rotatekv.tools import models, text

    model, tok = models.load("gemma3-270m", progress=False)
    _, calib = text.split_windows(tok, text.load_texts(), 0, 4, 512)
    # rotatekv2's fit (clips searched per layer), without its wider layers.
    cal = C.calibrate(model, calib, bits=2, clip="search", key_layout="auto", progress=False)
    nll = cal.settings["layout_nll"]
    assert cal.key_layouts == ["per_channel"] * 18, nll
    assert nll["chosen"] == "per_channel" and nll["per_channel"] < nll["fitted"] - 0.05, nll


def test_wider_layers_reach_the_stores_and_the_file(tmp_path, llama_data) -> None:
    """Layers calibration stores at a wider width: their plan entries come from the wider
    fit, their tokens are appended at that width, and the choice survives save/load."""
    m, data = llama_data
    spec = rh.model_spec(m)
    c2 = C.fit(data, spec, bits=2, clip="fixed", progress=False)
    c3 = C.fit(data, spec, bits=3, clip="search", progress=False)
    mixed = C.with_layer_bits(c2, c3, [1])
    assert mixed.layer_bits == [2, 3]
    assert np.array_equal(np.array(mixed.plan.key_perm)[1], np.array(c3.plan.key_perm)[1])
    assert np.array_equal(np.array(mixed.plan.key_perm)[0], np.array(c2.plan.key_perm)[0])
    assert mixed.plan.key_clip == [c2.plan.key_clip[0], c3.plan.key_clip[1]]
    mixed.save(tmp_path / "m.safetensors")
    back = C.Calibration.load(tmp_path / "m.safetensors", m)
    assert back.layer_bits == [2, 3]
    x = ids(1, 70)
    with torch.no_grad():
        rh.enable(m, back, QuantConfig(bits=2))
        cache = rh.new_cache(m)
        m(input_ids=x, cache=cache)
        rh.disable(m)
    store, _ = cache.store_of(0)
    widths = {(i, p.bits) for i in range(2) for p in store.page_buffers(i, 0)}
    assert widths == {(0, 2), (1, 3)}
    # A damaged width is refused on load.
    mixed.layer_bits = [2, 5]
    mixed.save(tmp_path / "bad.safetensors")
    with pytest.raises(rotatekv.FormatError, match="layer bits"):
        C.Calibration.load(tmp_path / "bad.safetensors")
    with pytest.raises(rotatekv.ArgumentError, match="layers"):
        C.with_layer_bits(c2, c3, [7])


def test_layer_ranking_measures_each_layer_alone(llama_data) -> None:
    m, data = llama_data
    spec = rh.model_spec(m)
    c2 = C.fit(data, spec, bits=2, clip="fixed", progress=False)
    c4 = C.fit(data, spec, bits=4, clip="fixed", progress=False)
    ranked = C.rank_layers(m, c2, c4, ids(2, 48, seed=5), QuantConfig(bits=2), progress=False)
    assert sorted(i for i, _ in ranked) == [0, 1]
    gains = [g for _, g in ranked]
    assert gains == sorted(gains, reverse=True) and all(math.isfinite(g) for g in gains)
    # 4-bit codes in a layer bring the model closer to its 16-bit self on these windows.
    assert max(gains) > 0


def test_promote_widens_the_layers_that_gain_most(llama_data, tmp_path) -> None:
    m, data = llama_data
    spec = rh.model_spec(m)
    c2 = C.fit(data, spec, bits=2, clip="fixed", progress=False)
    c3 = C.fit(data, spec, bits=3, clip="fixed", progress=False)
    w = ids(2, 48, seed=5)
    cfg = QuantConfig(bits=2, residual=8)
    ranked = C.rank_layers(m, c2, c3, w, cfg, progress=False)
    half = C.promote(m, c2, c3, w, cfg, 0.5, progress=False)
    best = ranked[0][0]
    assert half.layer_bits == [3 if i == best else 2 for i in range(2)]
    assert half.settings["wider_fraction"] == 0.5 and half.settings["wider_layers"] == [best]
    assert {e["layer"]: e["wider_gain"] for e in half.report} == {i: round(g, 6) for i, g in ranked}
    assert all("wider_gain" not in e for e in c2.report)  # the input is left as it was
    assert C.promote(m, c2, c3, w, cfg, 0.49, progress=False).layer_bits == [2, 2]
    assert C.promote(m, c2, c3, w, cfg, 1.0, progress=False).layer_bits == [3, 3]
    with pytest.raises(rotatekv.ArgumentError, match="fraction"):
        C.promote(m, c2, c3, w, cfg, 1.5, progress=False)
    half.save(tmp_path / "h.safetensors")
    assert C.Calibration.load(tmp_path / "h.safetensors", m).layer_bits == half.layer_bits


def test_default_2bit_method_ranks_and_widens_layers() -> None:
    """rotatekv2's build fits 2 and 3 bits and stores the top share of layers at 3; it needs
    the model and the calibration windows to rank them."""
    m = tiny("llama", seed=3)
    # Two layers: the default share (floor(0.45 * 2) = 0) would widen none; take half.
    meth = E.METHODS["rotatekv2"]
    meth = E.Method(
        meth.name, meth.bits, meth.config, {**meth.plan, "wider": {"bits": 3, "fraction": 0.5}},
        meth.description,
    )  # fmt: skip
    spec = rh.model_spec(m)
    calib = ids(2, 48, seed=6)
    data = C.collect(m, calib, n_queries=16, progress=False)
    cal, cfg = E.build(meth, spec, data, model=m, calib=calib)
    assert sorted(cal.layer_bits) == [2, 3] and cfg.residual == E.DEFAULT_RESIDUAL
    with pytest.raises(rotatekv.ArgumentError, match="model and calibration windows"):
        E.build(meth, spec, data)
    plan = E.fit_args(E.METHODS["rotatekv2"])
    assert "wider" not in plan and plan["bits"] == 2
    assert E.METHODS["rotatekv2"].plan["wider"] == {"bits": 3, "fraction": E.WIDER_FRACTION}


def test_calibrate_with_wider_layers() -> None:
    m = tiny("llama", seed=2)
    w = ids(2, 48, seed=7)
    kw = dict(n_queries=16, progress=False, clip="fixed")
    cal = C.calibrate(m, w, bits=2, wider_fraction=0.5, **kw)
    assert sorted(cal.layer_bits) == [2, 3] and cal.settings["wider_fraction"] == 0.5
    assert C.calibrate(m, w, bits=2, **kw).layer_bits is None
    with pytest.raises(rotatekv.ArgumentError, match="wider_fraction: needs bits 2 or 3"):
        C.calibrate(m, w, bits=4, wider_fraction=0.5, **kw)
    with pytest.raises(rotatekv.ArgumentError, match="windows"):
        C.calibrate(m, w.float(), bits=2, **kw)


def test_calibrate_cli_on_the_default_model(tmp_path, capsys) -> None:
    """``rotatekv calibrate`` at 2 bits widens 45% of the layers by default (13 of 30)."""
    pytest.importorskip("gguf")
    from rotatekv.tools.cli import main

    out = tmp_path / "c.safetensors"
    argv = ["calibrate", "--windows", "2", "--window-len", "64", "--clip", "fixed", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    got = capsys.readouterr()
    # --quiet: the result, no progress bars (collect, fit and rank each have one).
    assert "saved" in got.out and "%|" not in got.err, got.err
    from rotatekv.tools import models

    model, _ = models.load()
    cal = C.Calibration.load(out, model)
    assert cal.layer_bits is not None and cal.layer_bits.count(3) == 13
    assert cal.layer_bits.count(2) == 17
    # key_layout="auto" measured the fitted layouts against per-channel keys everywhere.
    nll = cal.settings["layout_nll"]
    every = nll["per_channel"] < nll["fitted"] - C.LAYOUT_NLL_MARGIN
    assert nll["chosen"] == ("per_channel" if every else "fitted"), nll
    assert (cal.key_layouts == ["per_channel"] * 30) == every, nll
    # The file stands in for rotatekv2's fit in `rotatekv eval`, with the policies on top.
    js = tmp_path / "e.json"
    argv = ["eval", "--windows", "1", "--window-len", "64", "--calib-windows", "2"]
    argv += ["--methods", "saliency", "--protocol", "fake", "--calibration", str(out)]
    assert main([*argv, "--json", str(js)]) == 0
    rows = {r["method"]: r for r in json.loads(js.read_text())["results"]}
    assert set(rows) == {"fp16", "rotatekv2", "saliency"}
    assert rows["saliency"]["settled_bits"] <= rows["rotatekv2"]["settled_bits"] + 1e-9
    assert "collected calibration data" not in capsys.readouterr().out
