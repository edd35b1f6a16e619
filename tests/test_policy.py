"""Attention mass (saliency) and the bit-width policies: kernel against a dense float64
reference, the allocation's optimality properties and budget, and the policies inside the
transformers integration (text models and a random-weight LLaVA)."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rotatekv
from reference import attention_mass_reference
from rotatekv import KVStore, QuantConfig
from rotatekv import policy as P
from rotatekv.saliency import _device_mass, _positions, attention_mass

transformers = pytest.importorskip("transformers")
import rotatekv.hf as rh  # noqa: E402
from test_hf import batch, tiny  # noqa: E402

# --------------------------------------------------------------------------------------------
# attention_mass
# --------------------------------------------------------------------------------------------


def _case(gen: torch.Generator, b: int, hq: int, hkv: int, tq: int, tk: int, d: int):
    q = torch.randn(b, hq, tq, d, generator=gen)
    k = torch.randn(b, hkv, tk, d, generator=gen)
    # Keys at gapped, per-sequence positions; the queries are the last tq of them.
    start = torch.randint(0, 40, (b, 1), generator=gen)
    kp = start + 2 * torch.arange(tk)[None]
    qp = kp[:, tk - tq :]
    valid = torch.rand(b, tk, generator=gen) > 0.15
    prior = 2 * torch.randn(b, hq, tq, generator=gen)
    return q, k, qp, kp, valid, prior


def _close(got, want: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    mass, count, lse = want
    np.testing.assert_array_equal(got.count.numpy(), count)
    np.testing.assert_allclose(got.mass.numpy(), mass, rtol=1e-4, atol=1e-5)
    fin = np.isfinite(lse)
    np.testing.assert_array_equal(np.isfinite(got.lse.numpy()), fin)
    np.testing.assert_allclose(got.lse.numpy()[fin], lse[fin], rtol=1e-5, atol=1e-5)


@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    tk=st.integers(1, 70),
    d=st.integers(1, 40),
    window=st.one_of(st.none(), st.integers(1, 20)),
    lag=st.integers(0, 10),
    softcap=st.one_of(st.none(), st.floats(0.5, 10.0)),
    extras=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_and_torch_version_match_the_dense_reference(
    b, hkv, group, tk, d, window, lag, softcap, extras, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tq = int(torch.randint(1, tk + 1, (1,), generator=gen))
    q, k, qp, kp, valid, prior = _case(gen, b, hkv * group, hkv, tq, tk, d)
    kw = dict(window=window, lag=lag, softcap=softcap, scale=0.7)
    if extras:
        kw.update(k_valid=valid, prior_lse=prior)
    want = attention_mass_reference(q, k, qp, kp, **kw)
    _close(attention_mass(q, k, qp, kp, **kw), want)
    # The CUDA kernels (their host build, driven through the same binding as on a GPU).
    got = _device_mass(
        q, k, qp, kp, kw.get("k_valid"), kw.get("prior_lse"), 0.7, softcap, window, lag, "emu"
    )
    _close(got, want)


def test_mass_without_prior_sums_to_the_number_of_query_heads(gen) -> None:
    q, k, _, _, _, _ = _case(gen, 2, 6, 2, 33, 33, 16)
    m = attention_mass(q, k)
    assert torch.allclose(m.mass.sum(1), torch.full((2,), 6.0 * 33), rtol=1e-5)
    # Each query counts every earlier key once; the lag removes exactly the diagonal band.
    assert m.count[0].tolist() == list(range(33, 0, -1))
    m = attention_mass(q, k, lag=5)
    assert m.count[0].tolist() == [max(0, 33 - j - 5) for j in range(33)]
    mean = m.mean(6)
    assert torch.all(mean[:, -5:] == 0) and torch.all(mean[:, :-5] > 0)


def test_a_prior_takes_its_share_of_every_query() -> None:
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    # All scores 0: query t sees t+1 keys; a prior of log(n) stands for n outside keys.
    prior = torch.full((1, 1, 4), math.log(3.0))
    m = attention_mass(q, k, prior_lse=prior)
    want = [sum(1 / (t + 1 + 3) for t in range(j, 4)) for j in range(4)]
    assert m.mass[0].tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q=torch.zeros(1, 3, 4)), rotatekv.ShapeError, "q: expected"),
        (dict(k=torch.zeros(1, 2, 4, 8)), rotatekv.ShapeError, "k: expected"),
        (dict(k=torch.zeros(2, 1, 4, 8)), rotatekv.ShapeError, "k: expected"),
        (dict(q_pos=torch.zeros(5, dtype=torch.int64)), rotatekv.ShapeError, "q_pos"),
        (dict(k_pos=torch.zeros(4)), rotatekv.ArgumentError, "k_pos: expected integer"),
        (dict(k_valid=torch.ones(1, 4)), rotatekv.ShapeError, "k_valid"),
        (dict(prior_lse=torch.zeros(1, 3, 5)), rotatekv.ShapeError, "prior_lse"),
        (dict(lag=-1), rotatekv.ArgumentError, "lag"),
        (dict(window=0), rotatekv.ArgumentError, "window"),
        (dict(scale=0.0), rotatekv.ArgumentError, "scale"),
        (dict(softcap=-1.0), rotatekv.ArgumentError, "softcap"),
        (dict(q=torch.zeros(1, 3, 4, 8, dtype=torch.int32)), rotatekv.ArgumentError, "q:"),
    ],
)
def test_attention_mass_refuses_bad_input(change, exc, match) -> None:
    kw = dict(q=torch.zeros(1, 3, 4, 8), k=torch.zeros(1, 1, 4, 8))
    kw.update(change)
    with pytest.raises(exc, match=match):
        attention_mass(**kw)


def test_device_binding_checks_its_tensors() -> None:
    from rotatekv import _rotatekv

    q, k = torch.zeros(1, 2, 3, 8), torch.zeros(1, 1, 3, 8)
    pos = torch.arange(3)[None]
    out = dict(
        lse=torch.empty(1, 2, 3), mass=torch.empty(1, 3), count=torch.empty(1, 3, dtype=torch.int32)
    )

    def call(device: str = "emu", **change: object) -> None:
        a = dict(q=q, k=k, q_pos=pos, k_pos=pos, k_valid=None, prior=None, **out)
        a.update(change)
        _rotatekv._cuda_attention_mass(device, *a.values(), 0.5, None, None, 0)

    call()
    with pytest.raises(rotatekv.DTypeError, match="q_pos: expected torch.int64"):
        call(q_pos=pos.int())
    with pytest.raises(rotatekv.ShapeError, match="mass: expected a contiguous tensor of 3"):
        call(mass=torch.empty(1, 4))
    with pytest.raises(rotatekv.ShapeError, match="k: expected"):
        call(k=torch.zeros(1, 1, 3, 4))
    with pytest.raises(rotatekv.DeviceError, match="device"):
        call("cpu")
    with pytest.raises(rotatekv.ArgumentError, match="CPU or CUDA"):
        attention_mass(q.to("meta"), k.to("meta"))


def test_positions_broadcast() -> None:
    assert _positions(torch.arange(3), 2, 3, "p").shape == (2, 3)
    assert _positions(None, 1, 4, "p").tolist() == [[0, 1, 2, 3]]


# --------------------------------------------------------------------------------------------
# water_fill and the ledgers
# --------------------------------------------------------------------------------------------

COST = {2: 3.0, 3: 4.0, 4: 5.0, 8: 9.0, 16: 16.5}


@given(
    scores=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=60),
    extra=st.floats(-5.0, 400.0),
    base=st.sampled_from([2, 3, 4]),
)
def test_water_fill_spends_the_budget_and_follows_the_scores(scores, extra, base) -> None:
    s = np.array(scores)
    spend = len(s) * COST[base] + extra
    w = P.water_fill(s, base, COST.__getitem__, spend)
    total = sum(COST[int(x)] for x in w)
    assert w.min() >= base
    if extra >= 0:
        assert total <= spend + 1e-9
        # Maximal: no token's next step fits in what is left.
        left = spend - total
        for x in w.tolist():
            if x < 16:
                nxt = P.CLASSES[P.CLASSES.index(x) + 1]
                assert COST[nxt] - COST[x] > left
    else:
        assert np.all(w == base)  # below the floor: the floor, nothing else
    # A token scored higher never gets fewer bits.
    order = np.argsort(s, kind="stable")
    ws = w[order]
    for i in range(len(s) - 1):
        if s[order[i]] < s[order[i + 1]]:
            assert ws[i] <= ws[i + 1]


def test_water_fill_spreads_equal_scores_evenly() -> None:
    w = P.water_fill(np.ones(100), 2, COST.__getitem__, 100 * 3.0 + 50)
    assert sorted(set(w.tolist())) == [2, 3] and (w == 3).sum() == 50
    # Interleaved, not the first half: a uniform budget over the sequence.
    assert 20 <= (w[:50] == 3).sum() <= 30


def test_water_fill_is_optimal_on_small_cases(gen) -> None:
    """Greedy by error removed per bit against exhaustive search (3 tokens, 5 classes)."""

    for _ in range(20):
        s = torch.rand(3, generator=gen).numpy() ** 3 * 10
        spend = float(torch.randint(9, 50, (1,), generator=gen))
        w = P.water_fill(s, 2, COST.__getitem__, spend)
        got = sum(si * P.rel_error(int(b)) for si, b in zip(s, w, strict=True))
        best = min(
            sum(si * P.rel_error(b) for si, b in zip(s, ws, strict=True))
            for ws in itertools.product(P.CLASSES, repeat=3)
            if sum(COST[b] for b in ws) <= spend
        )
        # Greedy on a knapsack can leave a little on the table; it stays within one step.
        assert got <= best + max(s) * (P.rel_error(2) - P.rel_error(3)) + 1e-12


def _fake_cost(layer: int, bits: int) -> float:
    return COST[bits] + 0.5 * layer


def test_allocator_meets_the_budget_over_prefill_and_decode(gen) -> None:
    a = P.Allocator("saliency", 4.2, [2, 2, 3], _fake_cost)
    # Layer budgets keep the base widths' differences.
    assert a.layer_budget[2] - a.layer_budget[0] == pytest.approx(
        _fake_cost(2, 3) - _fake_cost(0, 2)
    )
    b, t = 2, 50
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :7] = False
    sinks = torch.zeros(b, t, dtype=torch.bool)
    sinks[:, 7] = True
    for layer in range(3):
        mean = torch.rand(b, t, generator=gen)
        counted = torch.rand(b, t, generator=gen) > 0.2
        w = a.widths(layer, (b, t), mean, counted, valid, sinks)
        assert torch.all(w[sinks] == 16) and torch.all(w >= 2)
        for _ in range(30):
            a.widths(layer, (b, 1))
        for i in range(b):
            # Sinks are outside the ledger.
            assert a.tokens[layer][i] == int((valid[i] & ~sinks[i]).sum()) + 30
    # One budget over the layers: each sequence's total meets it within a step.
    for i in range(b):
        spent = sum(a.spent[m][i] for m in range(3))
        budget = sum(a.layer_budget[m] * a.tokens[m][i] for m in range(3))
        assert budget - 1.0 <= spent <= budget + 1e-9
    # Offsets are relative to the mean base: the average over layers is the budget.
    assert a.bits_per_element() == pytest.approx(4.2, abs=0.05)


def test_decoded_tokens_keep_the_layer_widths_at_their_budget() -> None:
    """Without statistics, a budget equal to what the layers' widths cost keeps them (a
    calibration's wider layers stay wider); a larger one is error-diffused over the steps."""
    bits = [2, 3, 2]
    mean_base = sum(_fake_cost(i, b) for i, b in enumerate(bits)) / 3
    a = P.Allocator("saliency", mean_base, bits, _fake_cost)
    for _ in range(20):
        for layer in range(3):
            assert a.widths(layer, (1, 1)).item() == bits[layer]
    a = P.Allocator("saliency", mean_base + 0.5, bits, _fake_cost)
    seen = [set(), set(), set()]
    for _ in range(20):
        for layer in range(3):
            seen[layer].add(a.widths(layer, (1, 1)).item())
    assert seen[0] == {2, 3} and seen[1] == {3, 4}
    assert a.bits_per_element() == pytest.approx(mean_base + 0.5, abs=1.0 / 20)


def test_policies_are_classes_behind_one_interface(gen) -> None:
    """Every QuantConfig policy but "fixed" is a Scorer, and an Allocator takes any Scorer:
    one that scores by position spends the budget on the newest tokens."""
    from rotatekv._config import POLICIES

    assert set(P.SCORERS) == set(POLICIES) - {"fixed"}
    for name in P.SCORERS:
        assert P.scorer(name).name == name
    assert P.scorer("akvq", P.AkvqRule(pivot_mass=0.5)).rule.pivot_mass == 0.5
    with pytest.raises(rotatekv.ArgumentError, match="policy: expected"):
        P.scorer("bogus")
    with pytest.raises(rotatekv.ArgumentError, match="policy: expected a name or a Scorer"):
        P.scorer(42)  # type: ignore[arg-type]

    class Newest:
        name = "newest"

        def scores(self, mean, counted, types):
            return torch.arange(1, mean.shape[0] + 1, dtype=torch.float64), "newest"

    a = P.Allocator(Newest(), 3.5, [2], _fake_cost)
    assert a.policy == "newest"
    t = 40
    mean = torch.rand(1, t, generator=gen)
    w = a.widths(0, (1, t), mean, torch.ones(1, t, dtype=torch.bool))[0]
    assert a.patterns[0] == ["newest"]
    # Widths never fall with position, and the budget bought more than the floor somewhere.
    assert torch.all(w[1:] >= w[:-1]) and int(w[-1]) > 2 and int(w[0]) == 2
    # The saliency class reproduces the name's allocation exactly.
    b1 = P.Allocator("saliency", 3.5, [2], _fake_cost)
    b2 = P.Allocator(P.Saliency(), 3.5, [2], _fake_cost)
    counted = torch.rand(1, t, generator=gen) > 0.1
    assert torch.equal(b1.widths(0, (1, t), mean, counted), b2.widths(0, (1, t), mean, counted))


def test_allocator_refuses_a_budget_below_its_floor() -> None:
    with pytest.raises(rotatekv.ArgumentError, match="budget: expected at least"):
        P.Allocator("akvq", 3.0, [2, 3], _fake_cost)
    # Below the layers' widths but above the floor's cost: wider layers give up bits.
    assert P.Allocator("akvq", 3.5, [2, 3], _fake_cost).floor == 2
    with pytest.raises(rotatekv.ArgumentError, match="floor"):
        P.Allocator("akvq", 5.0, [2, 3], _fake_cost, floor=3)
    with pytest.raises(rotatekv.ArgumentError, match="policy"):
        P.Allocator("fixed", 5.0, [2], _fake_cost)


def test_akvq_patterns() -> None:
    rule = P.AkvqRule(pivot_fraction=0.05, pivot_mass=0.3)
    n = 40
    counted = torch.ones(n, dtype=torch.bool)
    flat = torch.full((n,), 0.025)
    s, pat = P.akvq_scores(flat, counted, None, rule)
    assert pat == "even" and torch.all(s == 1)
    piv = flat.clone()
    piv[[0, 9]] = 0.5  # two tokens take most of the attention
    s, pat = P.akvq_scores(piv, counted, None, rule)
    assert pat == "pivot" and s[0] == s[9] > s[1]
    types = torch.full((n,), P.IMAGE)
    types[30:] = P.TEXT
    text = flat.clone()
    text[30:] = 0.1  # text tokens get 4x the attention of image tokens
    s, pat = P.akvq_scores(text, counted, types, rule)
    assert pat == "text" and s[30:].min() > s[:30].max()
    # Under the threshold, types alone do not make a layer text-salient.
    s, pat = P.akvq_scores(flat, counted, types, rule)
    assert pat == "even"
    with pytest.raises(rotatekv.ArgumentError, match="pivot_mass"):
        P.AkvqRule(pivot_mass=0.0)


def test_pivots_get_16_bits_and_text_more_than_images() -> None:
    a = P.Allocator("akvq", 4.0, [2], _fake_cost, P.AkvqRule(pivot_fraction=0.05))
    n = 40
    mean = torch.full((1, n), 0.01)
    mean[0, 3] = 2.0
    types = torch.full((1, n), P.IMAGE)
    types[0, 20:] = P.TEXT
    mean[0, 20:] = 0.05
    w = a.widths(0, (1, n), mean, torch.ones(1, n, dtype=torch.bool), types=types)
    assert w[0, 3] == 16 and a.patterns[0] == ["pivot+text"]
    assert w[0, 20:].float().mean() > w[0, 4:20].float().mean()


def test_allocator_append_for_custom_models(gen) -> None:
    """Allocator.append scores a prefill chunk by its queries, appends with the policy's
    widths, meets the budget over prefill and decode, and a failed append changes nothing."""
    store = KVStore(2, 2, 32, batch_size=2, config=QuantConfig(bits=2, residual=4))
    budget = store.class_bits(2) + 1.3
    a = P.Allocator("saliency", budget, [2, 2], lambda layer, c: store.class_bits(c))
    k = torch.randn(2, 2, 40, 32, generator=gen)
    v = torch.randn(2, 2, 40, 32, generator=gen)
    q = torch.randn(2, 4, 40, 32, generator=gen)
    q[:, :, :, :] += 3 * k[:, :1, 5:6, :]  # every query leans towards token 5
    w = a.append(store, 0, k, v, queries=q)
    assert torch.all(w[:, 5] == w.max())
    for i in range(6):
        a.append(store, 0, k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert store.seq_lens(0) == [46, 46]
    assert store.bits_per_element(settled=True) == pytest.approx(a.bits_per_element(), rel=1e-9)
    assert budget - 1.0 / 46 <= a.bits_per_element() <= budget + 1e-9
    before = (store.bits_per_element(), a.bits_per_element(), a.tokens[0].copy())
    with pytest.raises(rotatekv.ShapeError):
        a.append(store, 0, k, v[:, :, :5], queries=q)
    with pytest.raises(rotatekv.ArgumentError, match="token_types"):
        a.append(store, 0, k, v, token_types=torch.zeros(2, 3, dtype=torch.int64))
    after = (store.bits_per_element(), a.bits_per_element(), a.tokens[0].copy())
    assert before[:2] == after[:2] and np.array_equal(before[2], after[2])


def test_a_refused_append_leaves_the_ledgers_as_they_were() -> None:
    m = tiny("llama")
    ids, mask = batch(t=20, pads=(0, 0))
    rh.enable(m, None, QuantConfig(bits=2, residual=4, policy="saliency", budget=5.5))
    cache = rh.new_cache(m)
    with torch.no_grad():
        m(input_ids=ids, cache=cache)
        a = cache.allocator
        assert a is not None
        spent = {k: v.copy() for k, v in a.spent.items()}
        for s in cache.stores:
            s.max_tokens = 20
        with pytest.raises(rotatekv.CapacityError):
            m(input_ids=ids[:, :3], cache=cache)
    rh.disable(m)
    assert all(np.array_equal(spent[k], a.spent[k]) for k in spent)


def test_pivots_of_a_floor_layer_are_paid_by_later_layers() -> None:
    """A 2-bit layer at its floor keeps its pivots in 16 bits when the layers after it can
    give the bits back; the last layer cannot borrow; the total still meets the budget."""
    cost = lambda layer, c: COST[c]  # noqa: E731
    n = 100
    mean = torch.full((1, n), 0.01)
    mean[0, 7] = 5.0  # one pivot takes most of the attention
    counted = torch.ones(1, n, dtype=torch.bool)
    counted[0, -4:] = False  # the chunk's newest: no statistics
    budget = (COST[2] + COST[3]) / 2
    a = P.Allocator("akvq", budget, [2, 3], cost, P.AkvqRule(pivot_fraction=0.01))
    w0 = a.widths(0, (1, n), mean, counted)
    w1 = a.widths(1, (1, n), mean, counted)
    assert w0[0, 7] == 16 and a.patterns[0] == ["pivot"]
    assert torch.all(w0[0, -4:] == 2) and torch.all(w1[0, -4:] == 3)  # the layers' widths
    assert w1[0, 7] == 16
    # Layer 1 gave up what layer 0's pivot took: some of its tokens went down to 2 bits.
    assert int((w1 == 2).sum()) > 0
    total = a.spent[0][0] + a.spent[1][0]
    assert budget * 2 * n - 1.0 <= total <= budget * 2 * n + 1e-9
    # The last layer has nobody to borrow from: at its floor, its pivot stays narrow.
    b = P.Allocator("akvq", COST[2], [2, 2], cost, P.AkvqRule(pivot_fraction=0.01))
    b.widths(0, (1, n), mean * 0 + 0.01, counted)
    w = b.widths(1, (1, n), mean, counted)
    assert w[0, 7] == 2


def test_budget_is_checked_by_the_config() -> None:
    with pytest.raises(rotatekv.ArgumentError, match="budget: expected bits per element"):
        QuantConfig(policy="akvq")
    with pytest.raises(rotatekv.ArgumentError, match="budget: expected None"):
        QuantConfig(budget=3.0)
    with pytest.raises(rotatekv.ArgumentError, match="policy"):
        QuantConfig(policy="h2o", budget=3.0)
    with pytest.raises(rotatekv.ArgumentError, match=r"\[2, 17\]"):
        QuantConfig(policy="saliency", budget=float("nan"))


# --------------------------------------------------------------------------------------------
# Store accounting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["per_token", "per_channel"])
def test_class_bits_and_settled_bits(layout: str, gen) -> None:
    cfg = QuantConfig(bits=2, residual=8, key_layout=layout, page_tokens=32)
    s = KVStore(1, 2, 64, batch_size=1, config=cfg)
    bits = torch.tensor([[2, 3, 4, 8, 16] * 20])
    k = torch.randn(1, 2, 100, 64, generator=gen)
    s.append(0, k, k, bits=bits)
    per = {b: s.class_bits(b) for b in P.CLASSES}
    assert per[2] < per[3] < per[4] < per[8] < per[16]
    settled = sum(per[int(b)] for b in bits[0]) / 100
    assert s.bits_per_element(settled=True) == pytest.approx(settled, rel=1e-12)
    # The plain figure counts the window's tokens at 16 bits.
    win = 100 - sum(s.seq_lens(0)) + len(bits[0])  # all stored
    assert win == 100
    assert s.bits_per_element() > s.bits_per_element(settled=True)
    with pytest.raises(rotatekv.ArgumentError, match="bits"):
        s.class_bits(5)
    with pytest.raises(rotatekv.ArgumentError, match="bits"):
        s.class_bits(300)


def test_class_bits_is_what_a_one_class_store_reports(gen) -> None:
    for b in P.CLASSES:
        s = KVStore(1, 3, 32, batch_size=2, config=QuantConfig(bits=b))
        k = torch.randn(2, 3, 70, 32, generator=gen)
        s.append(0, k, k)
        assert s.bits_per_element() == pytest.approx(s.class_bits(b), rel=1e-12)


# --------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral"])
@pytest.mark.parametrize("policy", ["saliency", "akvq"])
def test_policies_meet_the_budget_in_the_model(arch: str, policy: str) -> None:
    m = tiny(arch)
    ids, mask = batch(t=40)
    rh.enable(m, None, QuantConfig(bits=2, residual=4, policy=policy, budget=5.5))
    cache = rh.new_cache(m)
    with torch.no_grad():
        m(input_ids=ids[:, :25], attention_mask=mask[:, :25], cache=cache)
        m(input_ids=ids[:, 25:], attention_mask=mask, cache=cache)  # scored against the store
        mk = mask
        for _ in range(6):
            mk = torch.cat([mk, torch.ones(2, 1, dtype=mk.dtype)], 1)
            m(input_ids=ids[:, -1:], attention_mask=mk, cache=cache)
    rh.disable(m)
    a = cache.allocator
    assert a is not None
    # The ledger is the store's own settled figure, and it meets the budget.
    assert cache.bits_per_element(settled=True) == pytest.approx(a.bits_per_element(), rel=1e-9)
    spent = sum(a.spent.values())
    budget = sum(a.layer_budget[m] * a.tokens[m] for m in a.spent)
    assert np.all(spent <= budget + 1e-9) and np.all(spent > budget - 1.0)
    assert cache.bits_per_element(settled=True) == pytest.approx(5.5, abs=0.02)
    widths = set()
    for layer in range(2):
        store, j = cache.store_of(layer)
        widths |= {p.bits for p in store.page_buffers(j, 0)}
    assert len(widths) >= 2, widths  # tokens really sit in several classes


def test_sinks_stay_16_bit_outside_the_budget() -> None:
    """A calibration's sink rule keeps tokens in 16 bits; the policy's budget covers the
    rest, and the cache reports both figures."""
    from rotatekv.calibrate import Calibration

    m = tiny("llama")
    spec = rh.model_spec(m)
    plan = rotatekv.RotationPlan.hadamard(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    ids, mask = batch(t=40, pads=(0, 5))
    # The median token's largest |hidden state|: about half the tokens become sinks.
    with torch.no_grad():
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
    th = [float(h.abs().amax(-1).median()) for h in hs[: spec.num_layers]]
    rh.enable(m, Calibration(plan, th), QuantConfig(bits=2, residual=4, policy="akvq", budget=5.0))
    cache = rh.new_cache(m)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, cache=cache)
    rh.disable(m)
    a = cache.allocator
    assert a is not None
    sinks = {k: v.tolist() for k, v in cache.sink_tokens.items()}
    assert all(0 < n < 35 for v in sinks.values() for n in v), sinks
    assert cache.bits_per_element(settled=True, sinks=False) == pytest.approx(
        a.bits_per_element(), rel=1e-9
    )
    assert a.bits_per_element() == pytest.approx(5.0, abs=0.05)
    assert cache.bits_per_element(settled=True) > 6.0  # the sinks on top


def test_a_budget_of_16_bits_everywhere_is_the_16_bit_store() -> None:
    m = tiny("llama")
    ids, mask = batch(t=20)
    rh.enable(m, None, QuantConfig(bits=16))
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask).logits
    rh.enable(m, None, QuantConfig(bits=2, residual=4, policy="saliency", budget=17.0))
    with torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask).logits
    rh.enable(m, None, QuantConfig(bits=2, residual=4))
    with torch.no_grad():
        low = m(input_ids=ids, attention_mask=mask).logits
    rh.disable(m)
    m_ = mask.bool()

    def err(x: torch.Tensor) -> float:
        return ((x - want)[m_].abs().max() / want[m_].abs().max()).item()

    # float32 rounding only (the recent window's band path sums in another order).
    assert err(got) < 2e-4 < err(low)


def test_beam_search_reorders_the_ledgers() -> None:
    m = tiny("llama")
    ids, mask = batch(t=10, pads=(0, 0))
    rh.enable(m, None, QuantConfig(bits=2, residual=2, policy="akvq", budget=5.2))
    with torch.no_grad():
        out = m.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False
        )
    rh.disable(m)
    assert out.shape == (2, 14)


def test_token_types_are_checked() -> None:
    m = tiny("llama")
    ids, mask = batch(t=10, pads=(0, 0))
    rh.enable(m, None, QuantConfig(bits=2, residual=2, policy="akvq", budget=5.2))
    with pytest.raises(rotatekv.ArgumentError, match="token_types"):
        m(input_ids=ids, token_types=torch.zeros(2, 9, dtype=torch.int64))
    with pytest.raises(rotatekv.ArgumentError, match="token_types"):
        m(input_ids=ids, token_types=torch.zeros(2, 10))
    m(input_ids=ids, token_types=torch.zeros(2, 10, dtype=torch.int64))
    rh.disable(m)


# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------

IMAGE_TOKEN = 127


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    tc = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    vc = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 120, (1, 12), generator=g)
    ids = torch.cat([text[:, :4], torch.full((1, 16), IMAGE_TOKEN), text[:, 4:]], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def test_llava_at_16_bits_matches_the_unmodified_model() -> None:
    m = tiny_llava()
    x = llava_inputs()
    with torch.no_grad():
        want = m(**x).logits
        rh.enable(m, None, QuantConfig(bits=16))
        # Only the language model's attention is swapped: the vision tower keeps its own.
        assert m.config.vision_config._attn_implementation != rh.ATTN_NAME
        assert m.config.text_config._attn_implementation == rh.ATTN_NAME
        got = m(**x).logits
        gen = m.generate(**x, max_new_tokens=5, do_sample=False)
        rh.disable(m)
        back = m(**x).logits
        gen_ref = m.generate(**x, max_new_tokens=5, do_sample=False)
    # Within float16 storage rounding; greedy tokens identical; disable() restores the model.
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-3
    assert torch.equal(gen, gen_ref)
    assert torch.equal(back, want)
    assert m.config.text_config._attn_implementation != rh.ATTN_NAME


def test_llava_image_tokens_become_token_types(monkeypatch) -> None:
    m = tiny_llava()
    x = llava_inputs()
    seen: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    widths = P.Allocator.widths

    def spy(self, layer, shape, mean=None, counted=None, valid=None, sinks=None, types=None):
        w = widths(self, layer, shape, mean, counted, valid, sinks, types)
        seen.append((types, w))
        return w

    monkeypatch.setattr(P.Allocator, "widths", spy)
    # Every layer text-salient (a random model has no such preference): text gets the bits.
    monkeypatch.setattr(P, "AkvqRule", functools.partial(P.AkvqRule, text_ratio=1e-6))
    rh.enable(m, None, QuantConfig(bits=2, residual=2, policy="akvq", budget=5.0))
    cache = rh.new_cache(m)
    with torch.no_grad():
        m(**x, cache=cache)
        out = m.generate(**x, max_new_tokens=3, do_sample=False)
    rh.disable(m)
    types, w = seen[0]
    assert types is not None
    assert torch.equal(types, (x["input_ids"] == IMAGE_TOKEN).long() * P.IMAGE)
    assert cache.allocator is not None and "text" in cache.allocator.patterns[0][0]
    text = types == P.TEXT
    # The chunk's newest tokens (within the recent window) have no statistics: leave them out.
    text[:, -2:] = False
    assert w[text].float().mean() > w[types == P.IMAGE].float().mean()
    assert out.shape[1] == x["input_ids"].shape[1] + 3
    # Decode steps carry text types too (their ids are not image tokens).
    assert all(t is not None and t.shape[1] == 1 for t, _ in seen[-2:])
