"""End-to-end generation benchmark (``rotatekv bench``, ``benches/e2e.py``).

``model.generate`` with a long prompt and N new tokens, for several KV caches, each run in a
fresh child process so that its peak memory is its own. Runs alternate between caches (repeat
r runs every cache once before repeat r + 1 starts), so slow drifts of the machine fall on all
of them alike.

Caches: ``fp16`` (transformers' ``DynamicCache`` in the model's dtype, the baseline),
``quanto2``/``quanto4`` (transformers' ``QuantizedCache`` with the optimum-quanto backend),
``hqq2``/``hqq4`` (the HQQ backend) and ``rotatekv2``/``rotatekv4`` (``rotatekv.hf`` with a
grouped-head pre-RoPE Hadamard plan, 32 recent tokens in 16 bits). A backend that does not
install or import is reported with the reason instead of figures.

Per run: ``peak_bytes`` (the child's peak RSS during generation: the kernel's high-water mark
is reset after the model is loaded and warmed up), ``base_bytes`` (RSS at that reset: model,
runtime), ``kv_peak_bytes = peak_bytes - base_bytes`` (what generation added: the cache and
activations), ``kv_bytes`` (what the cache holds at the end), ``prefill_s`` (the prompt's
forward) and ``decode_tok_s`` (new tokens of the whole batch per second after the first).
Every cache prefills in chunks of ``--prefill-chunk`` tokens (transformers'
``prefill_chunk_size``; 128 by default), so activations stay small beside the cache: each
sequence of a batch pays for its chunk's activations, which at 1024 tokens outweigh the
whole 8k-token cache of a 2-bit store of the default model (65 MiB against 31, measured).

On a GPU (``--device cuda``) the model, the prompt and every cache live on the device;
``peak_bytes`` is then ``torch.cuda.max_memory_allocated()`` during generation plus, for
rotatekv, the store's page bytes (pages are allocated outside torch's allocator and are not
released during a generation), ``base_bytes`` what torch held before it. ``--random-config``
(``llama3-8b``, or a transformers ``config.json``) builds a random-weight model from a real
configuration, for machines that cannot receive model files; prompts are then random tokens.

``max_batch``: the largest batch whose generation stays within ``--memory-budget``, found by
search. Peak memory grows about linearly in the batch (``fixed + B * per_seq``, from the runs
above); the runs bracket the answer (largest batch within the budget, smallest over it), and
candidates from the linear model, or the bracket's middle, are run (``--search-runs``, each at
most ``--verify-tokens`` prompt tokens) until the bracket closes. Where no candidate can be
run the linear model's answer is reported as predicted (``max_batch_detail``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

CACHES = ("fp16", "quanto2", "quanto4", "hqq2", "hqq4", "rotatekv2", "rotatekv4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Real configurations for random-weight runs (no download): Llama-3-8B's shape.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }
}


def random_model(name: str, dtype: torch.dtype, device: str) -> Any:
    """A random-weight causal LM built on ``device`` from a named or JSON configuration."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in CONFIGS:
        d = dict(CONFIGS[name])
    else:
        with open(name) as f:
            d = json.load(f)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def parse_bytes(s: str) -> int:
    """``"6GiB"``, ``"512MiB"``, ``"4e9"`` -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
    t = s.strip().lower()
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(float(t))


# --------------------------------------------------------------------------------------------
# The child: one generation
# --------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _make_cache(kind: str, model: Any) -> Any:
    """The cache object for ``kind`` (``None`` for rotatekv: enable() supplies it)."""
    from transformers import DynamicCache, QuantizedCache

    if kind == "fp16":
        return DynamicCache(config=model.config)
    if kind.startswith(("quanto", "hqq")):
        backend = "quanto" if kind.startswith("quanto") else "hqq"
        nbits = int(kind[len(backend) :])
        if backend == "quanto":
            import optimum.quanto  # noqa: F401 - a clear ImportError before transformers'
        else:
            import hqq  # noqa: F401
        return QuantizedCache(backend=backend, config=model.config, nbits=nbits)
    raise ValueError(kind)


def _cache_bytes(cache: Any) -> int:
    """Bytes a cache holds: tensors of every layer (quantized payloads, scales, residuals)."""
    if hasattr(cache, "nbytes") and not callable(cache.nbytes):
        return int(cache.nbytes)
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            inner = [getattr(x, a) for a in ("_data", "_scale", "_shift") if hasattr(x, a)]
            if inner and type(x) is not torch.Tensor:
                return sum(walk(t) for t in inner)
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(walk(t) for t in x)
        if isinstance(x, dict):
            return sum(walk(t) for t in x.values())
        if hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
            return sum(walk(v) for v in vars(x).values())
        return 0

    return sum(walk(layer) for layer in cache.layers)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One generation in this process; ``spec``: cache, context, batch, new_tokens, model,
    dtype, threads."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from .. import QuantConfig
    from .. import hf as rk_hf
    from .models import load
    from .text import load_texts, token_stream

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    kind, ctx, b, n = spec["cache"], spec["context"], spec["batch"], spec["new_tokens"]
    device = spec.get("device") or "cpu"
    # "emu" runs the CUDA kernels' host build on a CPU model (a test of the device path).
    where = "cpu" if device == "emu" else device
    gpu = where.startswith("cuda")
    dtype = DTYPES[spec.get("dtype", "bfloat16")]
    if spec.get("random_config"):
        model = random_model(spec["random_config"], dtype, where)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (b, ctx), generator=g)
    else:
        model, tok = load(spec.get("model"), dtype=dtype)
        model.to(where)
        stream = token_stream(tok, load_texts(spec.get("text")))
        if stream.numel() < ctx + b:
            reps = (ctx + b) // stream.numel() + 1
            stream = stream.repeat(reps)
        # Each row its own stretch of text (offsets spread over the stream).
        step = max(1, (stream.numel() - ctx) // max(b, 1))
        ids = torch.stack([stream[i * step : i * step + ctx] for i in range(b)])
    ids = ids.to(where)
    mask = torch.ones_like(ids)
    if kind.startswith("rotatekv"):
        bits = int(kind[len("rotatekv") :])
        store_device = "emu" if device == "emu" else None  # None: the model's device
        rk_hf.enable(model, None, QuantConfig(bits=bits, residual=32), device=store_device)
        cache = rk_hf.new_cache(model)
    else:
        cache = _make_cache(kind, model)

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if gpu:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            return scores

    # Warm-up on a short prompt: one-time allocations (thread pools, kernels) are not the
    # cache's.
    with torch.no_grad():
        warm_cache = None if kind.startswith("rotatekv") else _make_cache(kind, model)
        kw = {"cache": warm_cache} if warm_cache is not None else {}
        model.generate(
            ids[:1, :16], attention_mask=mask[:1, :16], max_new_tokens=2, do_sample=False, **kw
        )
    del warm_cache
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        exact_peak = True
    else:
        base = _rss()
        exact_peak = _reset_peak()
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            cache=cache,
            prefill_chunk_size=spec.get("prefill_chunk") or None,
        )
    if gpu:
        peak = torch.cuda.max_memory_allocated()
        if kind.startswith("rotatekv"):
            peak += _cache_bytes(cache)  # pages live outside torch's allocator
    else:
        peak = _peak()
    prefill = clock.t[0] - t0
    decode = (clock.t[-1] - clock.t[0]) if len(clock.t) > 1 else float("nan")
    bits = {"fp16": 16.0}.get(kind, float("".join(c for c in kind if c.isdigit()) or "nan"))
    if not exact_peak:
        base = 0  # no reset: the high-water mark covers the whole process
    return {
        "cache": kind,
        "bits": bits,
        "context": ctx,
        "batch": b,
        "new_tokens": n,
        "peak_bytes": int(peak),
        "base_bytes": int(base),
        "kv_peak_bytes": int(peak - base),
        "kv_bytes": _cache_bytes(cache),
        "prefill_s": prefill,
        "decode_tok_s": b * (len(clock.t) - 1) / decode if decode > 0 else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# The parent: alternation, capacity search, table, JSON, plots
# --------------------------------------------------------------------------------------------


def _child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "rotatekv.tools.bench", "--child", json.dumps(spec)]
    # Tools installed beside this interpreter (ninja, which optimum-quanto compiles its
    # kernels with) are found even when the virtualenv is not activated.
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = (res.stderr or res.stdout).strip().splitlines()
    # The traceback's last line says why; progress bars are not the reason.
    why = next((x for x in reversed(lines) if "Error" in x or "error" in x), "")
    return {"error": f"exit status {res.returncode}" + (f": {why.strip()}" if why else "")}


def available(kind: str) -> str | None:
    """``None`` when the cache's backend imports, else why not."""
    try:
        if kind.startswith("quanto"):
            import optimum.quanto  # noqa: F401
        elif kind.startswith("hqq"):
            import hqq  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means unavailable
        return f"{type(e).__name__}: {e}"
    return None


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    caches = [c for c in args.caches.split(",") if c]
    bad = [c for c in caches if c not in CACHES]
    if bad:
        raise SystemExit(f"--caches: unknown {bad}; expected a comma list of {CACHES}")
    contexts = [int(x) for x in str(args.context).split(",")]
    batches = [int(x) for x in str(args.batch).split(",")]
    base = {
        "new_tokens": args.new_tokens,
        "model": args.model,
        "text": args.text,
        "dtype": args.dtype,
        "threads": args.threads,
        "prefill_chunk": args.prefill_chunk,
        "device": args.device,
        "random_config": args.random_config,
    }
    unavailable = {c: why for c in caches if (why := available(c)) is not None}
    for c, why in unavailable.items():
        log(f"{c}: unavailable ({why})")
    live = [c for c in caches if c not in unavailable]
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for r in range(args.repeats):
        for ctx in contexts:
            for b in batches:
                for c in live:
                    spec = {**base, "cache": c, "context": ctx, "batch": b}
                    out = _child(spec, args.timeout)
                    if "error" in out:
                        errors[c] = out["error"]
                        log(f"[{r}] {c} ctx={ctx} B={b}: error {out['error']}")
                        continue
                    runs.setdefault((c, ctx, b), []).append(out)
                    mib = {k: out[k] / 2**20 for k in ("peak_bytes", "kv_peak_bytes", "kv_bytes")}
                    log(
                        f"[{r}] {c:10s} ctx={ctx:6d} B={b:3d}: peak {mib['peak_bytes']:8.1f} MiB"
                        f" (+{mib['kv_peak_bytes']:7.1f}), kv {mib['kv_bytes']:7.1f} MiB, prefill"
                        f" {out['prefill_s']:6.2f} s, decode {out['decode_tok_s']:6.2f} tok/s"
                    )
    results = []
    for rs in runs.values():
        med = {k: statistics.median(x[k] for x in rs) for k in ("prefill_s", "decode_tok_s")}
        results.append(
            {
                **rs[0],
                "peak_bytes": max(x["peak_bytes"] for x in rs),
                "kv_peak_bytes": max(x["kv_peak_bytes"] for x in rs),
                "base_bytes": min(x["base_bytes"] for x in rs),
                **med,
                "repeats": len(rs),
            }
        )
    measured = {c for c, _, _ in runs}
    report: dict[str, Any] = {
        "model": (
            f"random weights, {args.random_config} configuration"
            if args.random_config
            else args.model or "SmolLM2-135M-Instruct (packaged)"
        ),
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine(),
        "results": results,
        "unavailable": {**unavailable, **{c: e for c, e in errors.items() if c not in measured}},
    }
    if args.memory_budget:
        budget = parse_bytes(args.memory_budget)
        report["memory_budget_bytes"] = budget
        report["max_batch"], report["max_batch_detail"] = capacity(
            results, budget, max(contexts), base, args, log
        )
    return report


def capacity(
    results: list[dict[str, Any]],
    budget: int,
    ctx: int,
    base: dict[str, Any],
    args: argparse.Namespace,
    log: Any,
    child: Any = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Largest batch per cache within ``budget`` at context ``ctx`` (see the module doc).

    Every run at ``ctx`` is evidence: the largest batch seen within the budget is a lower
    bound, the smallest seen over it an upper one. Candidates come from the linear model
    (from the last fitting run's headroom once there is one), else halve the bracket; at most
    ``--search-runs`` runs, each of at most ``--verify-tokens`` prompt tokens."""
    child = child or _child
    out: dict[str, int] = {}
    detail: dict[str, Any] = {}
    for c in sorted({r["cache"] for r in results}):
        rs = sorted(
            (r for r in results if r["cache"] == c and r["context"] == ctx),
            key=lambda r: r["batch"],
        )
        if not rs:
            continue
        if len(rs) >= 2 and rs[-1]["batch"] > rs[0]["batch"]:
            per_seq = (rs[-1]["peak_bytes"] - rs[0]["peak_bytes"]) / (
                rs[-1]["batch"] - rs[0]["batch"]
            )
            fixed = rs[0]["peak_bytes"] - per_seq * rs[0]["batch"]
        else:
            per_seq = rs[0]["kv_peak_bytes"] / rs[0]["batch"]
            fixed = rs[0]["base_bytes"]
        per_seq = max(per_seq, 1.0)
        predicted = max(0, int((budget - fixed) // per_seq))
        seen = {r["batch"]: r["peak_bytes"] for r in rs}
        tried: list[tuple[int, int]] = []
        while len(tried) < args.search_runs:
            lo, hi = _bracket(seen, budget)
            if hi is not None and hi - lo <= 1:
                break
            # The headroom of the largest fitting run (of the model's intercept before any).
            cand = lo + max(1, int((budget - seen.get(lo, fixed)) // per_seq))
            if hi is not None and cand >= hi:
                cand = (lo + hi) // 2
            if cand <= lo or cand * ctx > args.verify_tokens:
                break
            # The whole generation, as in the runs above: a cache's peak can come late (quanto
            # dequantizes its whole history at every step).
            got = child({**base, "cache": c, "context": ctx, "batch": cand}, args.timeout)
            if "error" in got:
                break
            seen[cand] = got["peak_bytes"]
            tried.append((cand, got["peak_bytes"]))
        lo, hi = _bracket(seen, budget)
        exact = hi is not None and hi - lo <= 1
        # Where nothing larger could be run: the linear model's answer, within the bracket.
        n = lo if exact else max(lo, predicted)
        if hi is not None:
            n = min(n, hi - 1)
        how = "predicted" if n > lo else "verified" if exact else "verified, larger not tried"
        out[c] = n
        detail[c] = {
            "per_seq_bytes": int(per_seq),
            "fixed_bytes": int(fixed),
            "verified": how != "predicted",
            "exact": exact,
            "bracket": [lo, hi],
            "tried": tried,
        }
        log(f"max batch {c}: {n} ({how}; {per_seq / 2**20:.1f} MiB per sequence)")
    return out, detail


def _bracket(seen: dict[int, int], budget: int) -> tuple[int, int | None]:
    """(largest batch seen within ``budget`` or 0, smallest seen over it or None); a larger
    batch that fit below a smaller one that did not (noise) does not raise the lower bound."""
    over = [b for b, pk in seen.items() if pk > budget]
    hi = min(over, default=None)
    fit = [b for b, pk in seen.items() if pk <= budget and (hi is None or b < hi)]
    return max(fit, default=0), hi


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def table(report: dict[str, Any]) -> str:
    """Markdown table; ratios against fp16 at the same context and batch."""
    rows = report["results"]
    ref = {(r["context"], r["batch"]): r for r in rows if r["cache"] == "fp16"}
    lines = [
        "| cache | context | batch | peak MiB | gen. added MiB | KV MiB | KV vs fp16 |"
        " prefill s | decode tok/s | decode vs fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], CACHES.index(r["cache"]))):
        f = ref.get((r["context"], r["batch"]))
        kv_ratio = f"{f['kv_bytes'] / r['kv_bytes']:.2f}x less" if f and r["kv_bytes"] else "-"
        if r is f:
            kv_ratio = "1x"
        dec_ratio = f"{r['decode_tok_s'] / f['decode_tok_s']:.2f}x" if f else "-"
        lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r['peak_bytes'] / 2**20:.0f} |"
            f" {r['kv_peak_bytes'] / 2**20:.0f} | {r['kv_bytes'] / 2**20:.1f} | {kv_ratio} |"
            f" {r['prefill_s']:.2f} | {r['decode_tok_s']:.2f} | {dec_ratio} |"
        )
    if "max_batch" in report:
        b = report["memory_budget_bytes"] / 2**30
        caps = ", ".join(
            f"{c} {n}{'' if report['max_batch_detail'][c]['verified'] else ' (predicted)'}"
            for c, n in report["max_batch"].items()
        )
        lines.append(f"\nLargest batch within {b:.2f} GiB: {caps}")
    for c, why in report.get("unavailable", {}).items():
        lines.append(f"\n{c}: not measured ({why})")
    return "\n".join(lines)


def plots(report: dict[str, Any], out_dir: str) -> list[str]:
    """Memory vs context and tokens/s vs context, one line per cache (first batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = report["results"]
    b0 = min(r["batch"] for r in rows)
    paths = []
    for key, label, name in (
        ("kv_peak_bytes", "memory added by generation (MiB)", "e2e_memory.png"),
        ("decode_tok_s", "decode tokens/s", "e2e_decode.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in CACHES:
            pts = sorted(
                (r["context"], r[key]) for r in rows if r["cache"] == c and r["batch"] == b0
            )
            if pts:
                ys = [y / 2**20 if key.endswith("bytes") else y for _, y in pts]
                ax.plot([x for x, _ in pts], ys, marker="o", label=c)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"batch {b0}")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, name)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="smollm2 (default), gemma3-270m, a GGUF file or a directory"
    )
    p.add_argument("--text", default=None, help="UTF-8 prompt text (default: Wikipedia)")
    p.add_argument("--context", default="2048", help="prompt length(s), comma list")
    p.add_argument("--batch", default="1,4", help="batch size(s), comma list")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run")
    p.add_argument(
        "--prefill-chunk", type=int, default=128, help="prompt tokens per forward (0: all at once)"
    )
    p.add_argument(
        "--caches",
        default="fp16,quanto2,quanto4,rotatekv2,rotatekv4",
        help=f"comma list of {CACHES}",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="model dtype")
    p.add_argument("--memory-budget", default=None, help="e.g. 4GiB: find the largest batch")
    p.add_argument("--verify-tokens", type=int, default=65536, help="largest B*context to verify")
    p.add_argument("--search-runs", type=int, default=4, help="most runs of the capacity search")
    p.add_argument("--repeats", type=int, default=1, help="runs per (cache, context, batch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child run")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (emu: the kernels' host build)"
    )
    p.add_argument(
        "--random-config",
        default=None,
        help=f"random-weight model from a configuration: {sorted(CONFIGS)} or a config.json",
    )
    p.add_argument("--quiet", action="store_true", help="no line per run (the table still prints)")


def main_args(args: argparse.Namespace) -> int:
    report = run(args, log=(lambda *a, **k: None) if args.quiet else print)
    print(table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plots:
        for p in plots(report, args.plots):
            print(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(run_one(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(
        prog="rotatekv bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_args(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
