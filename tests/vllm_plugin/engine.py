"""One vLLM engine run for tests/vllm_plugin (vLLM keeps its backend choice per process, so
every configuration runs in its own process): greedy generation of the prompts in a JSON file,
printed as one ``RESULT <json>`` line with tokens, the baseline's top log-probabilities and
the pool's capacity in blocks and the preemptions counted.

    python tests/vllm_plugin/engine.py MODEL_DIR CONFIG_JSON PROMPTS_JSON [OVERRIDES_JSON]

``OVERRIDES_JSON``: ``{"llm": {...LLM arguments...}, "max_tokens": n, "ignore_eos": b}``.
"""

from __future__ import annotations

import json
import sys


def top2(step: dict) -> list[float]:
    """The two best log-probabilities of one step."""
    return sorted((lp.logprob for lp in step.values()), reverse=True)[:2]


def main() -> None:
    from vllm import LLM, SamplingParams

    model, config, prompts_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    with open(prompts_file) as f:
        prompts = json.load(f)
    kw = {} if config is None else {"additional_config": {"rotatekv": config}}
    args = dict(
        model=model,
        enforce_eager=True,
        block_size=64,
        max_model_len=1024,
        dtype="bfloat16",
        # Prompts share a prefix (prefix caching shares its blocks) and are longer than one
        # step's token budget (chunked prefill).
        enable_prefix_caching=True,
        max_num_batched_tokens=128,
        seed=0,
        disable_log_stats=False,
        **kw,
    )
    args.update(over.get("llm", {}))
    llm = LLM(**args)
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=over.get("max_tokens", 32),
        ignore_eos=over.get("ignore_eos", False),
        logprobs=2,
    )
    outs = llm.generate(prompts, sp)
    metrics = llm.get_metrics()
    preempted = sum(getattr(m, "value", 0) for m in metrics if m.name == "vllm:num_preemptions")
    res = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "top2": [[top2(d) for d in o.outputs[0].logprobs] for o in outs],
        "blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": preempted,
    }
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
