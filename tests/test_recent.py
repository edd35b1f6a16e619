"""rotatekv.recent: the 16-bit recent window beside a paged pool, driven as a serving engine
drives it (requests in chunks and decode steps, a random subset scheduled each step, shared
prefix blocks, too few side rows) and compared query by query with a KVStore of the same
format whose ``residual`` is the window each query got, fed token by token. Inputs are fresh
random draws; the seed is printed on failure."""

from __future__ import annotations

import math

import pytest
import torch

from rotatekv import KVStore, QuantConfig, RotationPlan, engine, paged, recent
from rotatekv._rope import from_config

SEED = int(torch.randint(0, 2**31 - 1, ()).item())


def half(*shape: int, g: torch.Generator) -> torch.Tensor:
    # 16-bit values: the store rounds window tokens to float16 before it quantizes them.
    return torch.randn(*shape, generator=g).half().float()


class Engine:
    """Requests of ``lens`` tokens written and attended step by step through one pool;
    request 1 shares request 0's first block and starts after it (prefix caching)."""

    def __init__(self, fmt, plan, lens, capacity, g, window=None, softcap=None):
        self.fmt, self.plan, self.lens, self.g = fmt, plan, lens, g
        self.window, self.softcap = window, softcap
        bs, h, d = fmt.block_size, fmt.num_kv_heads, fmt.head_dim
        need = [math.ceil(n / bs) for n in lens]
        total = sum(need) + 2
        ids = torch.randperm(total, generator=g).tolist()
        self.blocks = [ids[sum(need[:b]) : sum(need[: b + 1])] for b in range(len(lens))]
        self.blocks[1][0] = self.blocks[0][0]
        self.k = [half(n, h, d, g=g) for n in lens]
        self.v = [half(n, h, d, g=g) for n in lens]
        self.k[1][:bs], self.v[1][:bs] = self.k[0][:bs], self.v[0][:bs]
        self.q = [half(n, 2 * h, d, g=g) for n in lens]
        self.pool = fmt.new_pool(total)
        self.rw = recent.RecentWindow(8, bs, 1, h, d, capacity=capacity, dtype=torch.float16)
        self.done = [0, bs, 0]  # request 1's first block is cached
        self.got: list[tuple[int, int, int, torch.Tensor]] = []  # (req, pos, w, out)

    def step(self, reqs: list[int], sizes: list[int]) -> None:
        bs = self.fmt.block_size
        width = max(len(b) for b in self.blocks)
        table = torch.full((len(reqs), width), 0, dtype=torch.int32)
        ks, vs, qs, ss, qsl, lens = [], [], [], [], [0], []
        for i, (b, n) in enumerate(zip(reqs, sizes, strict=True)):
            table[i, : len(self.blocks[b])] = torch.tensor(self.blocks[b])
            a = self.done[b]
            pos = torch.arange(a, a + n)
            blk = torch.tensor(self.blocks[b])[pos // bs]
            ss.append(blk * bs + pos % bs)
            ks.append(self.k[b][a : a + n])
            vs.append(self.v[b][a : a + n])
            qs.append(self.q[b][a : a + n])
            qsl.append(qsl[-1] + n)
            lens.append(a + n)
        k, v, q, slots = (torch.cat(x) for x in (ks, vs, qs, ss))
        qsl_t, lens_t = torch.tensor(qsl, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
        st = self.rw.begin(object(), qsl_t, lens_t, table, slots, self.pool.shape[0] * bs)
        paged.write(self.pool, self.fmt, k, v, slots, plan=self.plan, layer=0)
        self.rw.store(0, k, v)
        kw = dict(scale=0.125, window=self.window, softcap=self.softcap, plan=self.plan)
        args = (self.rw, 0, self.pool, self.fmt, q, k, v, table)
        out = recent.attend(*args, **kw)  # the fused kernel (CPU pool)
        # The torch composition (gathers, dense attention, merge) computes the same.
        torch.testing.assert_close(
            out, recent.attend_composed(*args, **kw), atol=1e-5, rtol=1e-5, msg=f"seed {SEED}"
        )
        for i, (b, n) in enumerate(zip(reqs, sizes, strict=True)):
            for j in range(n):
                row = qsl[i] + j
                self.got.append((b, self.done[b] + j, int(st.shift[i]), out[row]))
            self.done[b] += n

    def run(self) -> None:
        g = self.g
        started = False
        while any(d < n for d, n in zip(self.done, self.lens, strict=True)):
            live = [b for b in range(3) if self.done[b] < self.lens[b]]
            if not started:
                live = [b for b in live if b != 1]  # request 1 waits for its shared block
            started = started or self.done[0] >= self.fmt.block_size
            perm = torch.randperm(len(live), generator=g).tolist()
            reqs = [live[i] for i in perm if torch.rand((), generator=g) < 0.8] or [live[0]]
            sizes = []
            for b in reqs:
                big = torch.rand((), generator=g) < 0.4
                n = int(torch.randint(2, 40, (), generator=g)) if big else 1
                sizes.append(min(n, self.lens[b] - self.done[b]))
            self.step(reqs, sizes)

    def check(self) -> None:
        """Each query against a store with the window it got, fed token by token."""
        by: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        for b, p, w, o in self.got:
            by.setdefault((b, w), {})[p] = o
        for (b, w), outs in by.items():
            cfg = QuantConfig(bits=self.fmt.bits, page_tokens=self.fmt.block_size, residual=w)
            s = KVStore(1, self.fmt.num_kv_heads, self.fmt.head_dim, config=cfg, plan=self.plan)
            for p in range(max(outs) + 1):
                s.append(
                    0,
                    self.k[b][p : p + 1].transpose(0, 1)[None],
                    self.v[b][p : p + 1].transpose(0, 1)[None],
                )
                if p in outs:
                    q = self.q[b][p : p + 1].transpose(0, 1)[None]
                    want = s.attend(0, q, scale=0.125, window=self.window, softcap=self.softcap)[
                        0, :, 0
                    ]
                    torch.testing.assert_close(
                        outs[p],
                        want,
                        atol=2e-5,
                        rtol=1e-4,
                        msg=f"seed {SEED}: request {b} position {p} window {w}",
                    )


def plan_for(h: int, d: int) -> RotationPlan:
    return RotationPlan.hadamard(1, h, d, mode="post_rope")


@pytest.mark.parametrize("bits,window,softcap", [(2, None, None), (4, 45, 30.0)])
def test_every_query_sees_its_newest_tokens_in_16_bits(bits, window, softcap):
    g = torch.Generator().manual_seed(SEED + bits)
    fmt = paged.BlockFormat(2, 64, bits=bits, block_size=32)
    e = Engine(fmt, plan_for(2, 64), [150, 70, 90], 1024, g, window, softcap)
    e.run()
    e.check()
    # With room for every window, only request 1's first chunk (its shared block was
    # written by request 0, mostly outside request 0's windows) can have a shorter one.
    short = {(b, p) for b, p, w, _ in e.got if w < e.rw.residual}
    assert all(b == 1 for b, _ in short), f"seed {SEED}: {sorted(short)[:5]}"
    assert len(e.got) == sum(e.lens) - fmt.block_size


def test_too_few_side_rows_shrink_windows_but_stay_exact():
    g = torch.Generator().manual_seed(SEED + 7)
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=32)
    e = Engine(fmt, plan_for(2, 64), [120, 60, 100], 16, g)  # two chunks of side rows
    e.run()
    e.check()
    assert any(w < e.rw.residual for _, _, w, _ in e.got), f"seed {SEED}: nothing evicted"
    assert e.rw.in_use() <= e.rw.chunks


def test_dense_attention_and_merge_equal_one_softmax():
    g = torch.Generator().manual_seed(SEED + 11)
    t, hq, hk, r, d = 5, 6, 2, 7, 16
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, 2 * r, hk, d, generator=g)
    v = torch.randn(t, 2 * r, hk, d, generator=g)
    mask = torch.rand(t, 2 * r, generator=g) < 0.7
    mask[:, 0] = True
    want, lse = engine.dense_attention(q, k, v, mask, 0.3)
    a = engine.dense_attention(q, k[:, :r], v[:, :r], mask[:, :r], 0.3)
    b = engine.dense_attention(q, k[:, r:], v[:, r:], mask[:, r:], 0.3)
    torch.testing.assert_close(engine.merge(*a, *b)[0], want, atol=1e-5, rtol=1e-5)
    # Against a plain softmax per query and head.
    rep = k.repeat_interleave(hq // hk, 2)
    s = torch.einsum("thd,trhd->thr", q, rep) * 0.3
    s = s.masked_fill(~mask[:, None], float("-inf"))
    ref = torch.einsum("thr,trhd->thd", s.softmax(-1), v.repeat_interleave(hq // hk, 2))
    torch.testing.assert_close(want, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_positions_are_the_last_of_each_request():
    pos = recent.positions_of(torch.tensor([0, 3, 4, 4, 6]), torch.tensor([10, 1, 0, 2]))
    assert pos.tolist() == [7, 8, 9, 0, 0, 1]


def test_bad_window_settings_name_the_argument():
    with pytest.raises(ValueError, match="residual"):
        recent.RecentWindow(0, 32, 1, 2, 64, 64)
    with pytest.raises(ValueError, match="residual"):
        recent.RecentWindow(64, 32, 1, 2, 64, 64)
    with pytest.raises(ValueError, match="capacity"):
        recent.RecentWindow(16, 32, 1, 2, 64, 8)


def test_rope_from_a_config_matches_the_models_rotary_module():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    )
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    inv, scaling = from_config(cfg, 0)
    torch.testing.assert_close(inv, rot.inv_freq.float())
    assert scaling == pytest.approx(float(rot.attention_scaling))
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0}
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    torch.testing.assert_close(from_config(cfg, 0)[0], rot.inv_freq.float())


@pytest.mark.parametrize("hq,d,r,window", [(3, 64, 5, None), (2, 128, 16, 20), (1, 32, 1, None)])
def test_fused_rows_equal_the_composition_on_bf16_inputs(hq, d, r, window):
    """Random ragged steps with bf16 queries and rows (as vLLM passes them), odd GQA and
    window sizes: the fused kernel's one softmax equals gathers + dense attention + merge."""
    g = torch.Generator().manual_seed(SEED + hq * d + r)
    bs, h = 32, 1
    fmt = paged.BlockFormat(h, d, bits=2, block_size=bs, fp_format="bfloat16")
    plan = plan_for(h, d)
    lens = [45, 1, 77, 33]
    qlen = [13, 1, 1, 33]
    nblk = [math.ceil(n / bs) for n in lens]
    ids = torch.randperm(sum(nblk), generator=g).tolist()
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int64)
    slots_all = []
    for b, n in enumerate(lens):
        blk = torch.tensor(ids[sum(nblk[:b]) : sum(nblk[: b + 1])])
        table[b, : nblk[b]] = blk
        pos = torch.arange(n)
        slots_all.append(blk[pos // bs] * bs + pos % bs)
    pool = fmt.new_pool(sum(nblk))
    rw = recent.RecentWindow(r, bs, 1, h, d, capacity=64 * r, dtype=torch.bfloat16)
    # First step: every request's older tokens (prefill without queries of interest).
    for first in (True, False):
        sl = [n - q if first else n for n, q in zip(lens, qlen, strict=True)]
        ql = [n - q if first else q for n, q in zip(lens, qlen, strict=True)]
        qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(ql), 0)), dtype=torch.int32)
        slots = torch.cat([s[a - q : a] for s, a, q in zip(slots_all, sl, ql, strict=True)])
        t = int(qsl[-1])
        k = torch.randn(t, h, d, generator=g).bfloat16()
        v = torch.randn(t, h, d, generator=g).bfloat16()
        q = torch.randn(t, hq * h, d, generator=g).bfloat16()
        rw.begin(
            object(), qsl, torch.tensor(sl, dtype=torch.int32), table, slots, pool.shape[0] * bs
        )
        paged.write(pool, fmt, k, v, slots, plan=plan)
        rw.store(0, k, v)
        args = (rw, 0, pool, fmt, q, k, v, table)
        kw = dict(scale=0.2, window=window, softcap=None, plan=plan)
        got = recent.attend(*args, **kw)
        assert got.dtype == torch.bfloat16
        want = recent.attend_composed(*args, **kw)
        # bf16 output: one rounding of the float32 result.
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2, msg=f"seed {SEED}")
        out = torch.empty_like(q)
        assert recent.attend(*args, **kw, out=out) is out
        torch.testing.assert_close(out, got, atol=0, rtol=0)


def test_bad_recent_rows_name_the_argument():
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=32)
    pool = fmt.new_pool(2)
    q = torch.randn(3, 4, 64)
    table = torch.tensor([[0, 1]])
    lens, qsl = torch.tensor([40]), torch.tensor([0, 3])
    rows = torch.randn(8, 2, 64)
    ok = dict(
        recent_k=rows,
        recent_v=rows,
        recent_idx=torch.full((3, 4), -1),
        recent_lag=torch.tensor([4]),
    )
    paged.attend(pool, fmt, q, table, lens, qsl, **ok)
    bad = [
        ({"recent_idx": torch.full((3, 4), 8)}, "recent_idx"),
        ({"recent_idx": torch.full((2, 4), -1)}, "recent_idx"),
        ({"recent_lag": torch.tensor([5])}, "recent_lag"),
        ({"recent_lag": torch.tensor([1, 1])}, "recent_lag"),
        ({"recent_v": torch.randn(8, 2, 32)}, "recent_v"),
        ({"recent_k": torch.randn(8, 3, 64)}, "recent_k"),
        ({"recent_v": None}, "recent_k"),
        ({"step_k": rows}, "step_k"),
    ]
    for change, name in bad:
        with pytest.raises(ValueError, match=name):
            paged.attend(pool, fmt, q, table, lens, qsl, **{**ok, **change})
    with pytest.raises(ValueError, match="causal"):
        paged.attend(pool, fmt, q, table, lens, qsl, causal=False, **ok)
