"""Calibrations under tensor parallelism: a rank's slice of a whole-model plan
(``rotatekv.vllm.plan_for_heads``) must store exactly the whole model's codes for the KV
heads the rank holds (``rank_heads``, vLLM's split), so a calibrated cache is the same cache
on one rank or many. Needs no vLLM: the package's top level imports none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rotatekv import RotationPlan, paged
from rotatekv.vllm import plan_for_heads, rank_heads

SEED = int(torch.randint(0, 2**31 - 1, ()).item())


def test_rank_heads_split_as_vllm_does():
    assert [rank_heads(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [rank_heads(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [rank_heads(1, 2, r) for r in range(2)] == [(0, 1), (0, 1)]  # replicated
    assert [rank_heads(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        rank_heads(3, 2, 0)


@pytest.mark.parametrize("heads,group_heads,tp", [(4, 2, 2), (4, 1, 4), (3, 1, 3), (2, 2, 1)])
def test_a_ranks_plan_stores_the_whole_models_codes_for_its_heads(heads, group_heads, tp):
    rng = np.random.default_rng(SEED)
    g = torch.Generator().manual_seed(SEED)
    layers, d, n, gqa = 2, 64, 77, 2
    n_grp = group_heads * d
    perm = np.stack(
        [
            np.concatenate([rng.permutation(n_grp) for _ in range(heads // group_heads)])
            for _ in range(layers)
        ]
    ).astype(np.int32)
    full = RotationPlan(
        layers,
        heads,
        d,
        mode="post_rope",
        group_heads=group_heads,
        key_perm=perm,
        key_clip=[0.9, 0.8],
        value_clip=[1.0, 0.95],
    )
    k = torch.randn(n, heads, d, generator=g)
    v = torch.randn(n, heads, d, generator=g)
    q = torch.randn(n, heads * gqa, d, generator=g)
    slots = torch.arange(n)
    table, lens, qsl = torch.tensor([[0, 1, 2]]), torch.tensor([n]), torch.tensor([0, n])

    def run(plan, h0, h1):
        fmt = paged.BlockFormat(h1 - h0, d, bits=2, block_size=32)
        pool = fmt.new_pool(3)
        paged.write(pool, fmt, k[:, h0:h1], v[:, h0:h1], slots, plan=plan, layer=1)
        out = paged.attend(
            pool, fmt, q[:, h0 * gqa : h1 * gqa], table, lens, qsl, plan=plan, layer=1
        )
        return pool.view(3, h1 - h0, -1), out

    pool, out = run(full, 0, heads)
    for rank in range(tp):
        h0, h1 = rank_heads(heads, tp, rank)
        part = plan_for_heads(full, h0, h1)
        assert part.num_kv_heads == h1 - h0
        p_pool, p_out = run(part, h0, h1)
        assert torch.equal(p_pool, pool[:, h0:h1]), f"seed {SEED}: rank {rank} of {tp}"
        torch.testing.assert_close(
            p_out, out[:, h0 * gqa : h1 * gqa], atol=1e-6, rtol=1e-6, msg=f"seed {SEED}"
        )


def test_a_hadamard_group_across_two_ranks_is_refused():
    full = RotationPlan.hadamard(1, 4, 64, mode="post_rope", group_heads=4)
    with pytest.raises(ValueError, match="calibration"):
        plan_for_heads(full, 0, 2)
