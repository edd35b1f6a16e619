"""rotatekv: packed 2-bit rotated KV caches. Run the demo on the packaged model, evaluate KV-cache
methods, calibrate a rotation plan, or benchmark generation end to end.

Arguments are checked before torch or a model is loaded; an error is one line (exit status 2)
unless --debug is given."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(SystemExit):
    """A bad argument: one line on stderr, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--window-len", type=int, default=512, help="tokens per window")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows")
    p.add_argument(
        "--methods",
        default="fp16,rtn2,kivi2,quarot2,rotatekv2-paper,rotatekv2",
        help="comma list of methods (rotatekv.tools.methods.METHODS)",
    )
    p.add_argument(
        "--protocol",
        choices=("fake", "decode", "both"),
        default="both",
        help="fake: one forward per window over the quantized store; decode: token by token",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="bits per element for the policy methods (akvq, saliency; default: rotatekv2's "
        "settled effective bits on the same windows)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="rotatekv2's calibration from `rotatekv calibrate --out` (same windows), "
        "instead of fitting it again",
    )
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--plots", default=None, help="write key-channel plots (PNG) here")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="windows run at once (default: 8, fewer for long windows to bound memory)",
    )


def _positive(name: str, v: int) -> None:
    if v <= 0:
        raise UsageError(f"--{name}: expected a positive integer, got {v}")


def run_eval(args: argparse.Namespace) -> int:
    """``rotatekv eval``: perplexity of KV-cache methods (see rotatekv.tools.eval)."""
    from .methods import parse_methods

    for name in ("windows", "window_len", "calib_windows"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.batch is not None:
        _positive("batch", args.batch)
    methods = parse_methods(args.methods)  # before torch and the model load
    import torch

    from .. import calibrate as cal_mod
    from . import eval as ev
    from . import models, text

    protocols = ["fake", "decode"] if args.protocol == "both" else [args.protocol]
    model, tok = models.load(args.model, progress=not args.quiet)
    docs = text.load_texts(args.text)
    windows, calib = text.split_windows(
        tok, docs, args.windows, args.calib_windows, args.window_len
    )
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct (packaged)'}, "
        f"{windows.shape[0]} windows x {windows.shape[1]} tokens, "
        f"{calib.shape[0]} calibration windows, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    batch = args.batch or max(1, min(8, 8192 // args.window_len))
    _positive("batch", batch)
    prebuilt = {}
    if args.calibration:
        cal = cal_mod.Calibration.load(args.calibration, model)
        prebuilt["rotatekv2"] = (cal, ev.METHODS["rotatekv2"].config)
    rows = ev.evaluate(
        model, windows, methods, protocols, calib=calib, batch=batch, budget=args.budget,
        prebuilt=prebuilt, progress=not args.quiet,
    )  # fmt: skip
    print(ev.table(rows))
    if args.json:
        ev.write_json(args.json, args.model or "SmolLM2-135M-Instruct", args.text or "wikipedia",
                      windows, rows)  # fmt: skip
    if args.plots:
        spec = ev.rh.model_spec(model)
        data = cal_mod.collect(model, calib, progress=not args.quiet)
        cal = cal_mod.fit(
            data, spec, progress=not args.quiet, **ev.fit_args(ev.METHODS["rotatekv2"])
        )
        n = spec.num_layers
        paths = ev.plot_channels(data, spec, cal, sorted({0, n // 2, n - 1}), Path(args.plots))
        print("plots:", ", ".join(str(p) for p in paths))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """``rotatekv calibrate``: fit a plan and sink rule, save them to one file."""
    _positive("windows", args.windows)
    _positive("window-len", args.window_len)
    from .. import QuantConfig
    from .. import calibrate as cal_mod
    from . import eval as ev
    from . import models, text

    model, tok = models.load(args.model, progress=not args.quiet)
    docs = text.load_texts(args.text)
    _, calib = text.split_windows(tok, docs, 0, args.windows, args.window_len)
    cal = cal_mod.calibrate(
        model,
        calib,
        bits=args.bits,
        mode=args.mode,
        reorder=args.reorder,
        clip=args.clip if args.clip in ("search", "fixed") else float(args.clip),
        sinks=not args.no_sinks,
        key_layout=args.key_layout,
        wider_fraction=(
            args.wider_fraction
            if args.wider_fraction is not None
            else (ev.WIDER_FRACTION if args.bits == 2 else 0.0)
        ),
        config=QuantConfig(bits=args.bits, residual=args.residual),
        progress=not args.quiet,
    )
    cal.save(args.out)
    print(cal_mod.describe(cal))
    print(f"saved {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet", action="store_true", help="no progress bars (results still print)"
    )
    # The model and text every model command reads.
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--model",
        default=None,
        help="smollm2 (the default), gemma3-270m (packaged), a GGUF file or a transformers "
        "directory",
    )
    data.add_argument("--text", default=None, help="UTF-8 text file (default: Wikipedia)")
    parser = argparse.ArgumentParser(
        prog="rotatekv", description=__doc__.split("\n\n")[0], formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"rotatekv {__version__}")
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="the main job: calibrate, evaluate and generate on the packaged model "
        "(--synthetic: kernel speed and memory on synthetic data)",
        formatter_class=fmt,
        parents=[common],
    )
    demo.add_argument("--synthetic", action="store_true", help="synthetic data, no model")
    demo.add_argument("--windows", type=int, default=4, help="evaluation windows")
    demo.add_argument("--window-len", type=int, default=512, help="tokens per window")
    demo.add_argument("--context", type=int, default=16384, help="--synthetic: context length")
    demo.add_argument("--batch", type=int, default=1, help="--synthetic: sequences")
    demo.add_argument("--repeats", type=int, default=5, help="--synthetic: timing repeats")
    ev = sub.add_parser(
        "eval",
        help="perplexity of KV-cache methods on a model",
        formatter_class=fmt,
        parents=[common, data],
    )
    _add_eval_args(ev)
    cal = sub.add_parser(
        "calibrate",
        help="fit a rotation plan and sink rule to a model",
        formatter_class=fmt,
        parents=[common, data],
    )
    cal.add_argument("--windows", type=int, default=8, help="calibration windows")
    cal.add_argument("--window-len", type=int, default=512, help="tokens per window")
    cal.add_argument("--bits", type=int, default=2, help="bits of the quantized tokens")
    cal.add_argument(
        "--mode", choices=("pre_rope", "post_rope"), default="pre_rope", help="RoPE placement"
    )
    cal.add_argument("--reorder", default="auto", help="channel reordering rule")
    cal.add_argument("--clip", default="search", help="search, fixed or a ratio")
    cal.add_argument("--no-sinks", action="store_true", help="no attention-sink rule")
    cal.add_argument(
        "--key-layout",
        choices=("per_token", "per_channel", "auto"),
        default="auto",
        help="key grouping per layer",
    )
    cal.add_argument(
        "--wider-fraction",
        type=float,
        default=None,
        help="share of layers stored at bits + 1 (default: 0.45 at 2 bits, as rotatekv2)",
    )
    cal.add_argument(
        "--residual",
        type=int,
        default=32,
        help="recent 16-bit tokens of the store the layers are ranked with",
    )
    cal.add_argument("--out", required=True, help="safetensors file to write")
    # `rotatekv bench` has its own parser (rotatekv.tools.bench, which needs torch): main hands it
    # the arguments, so that the other commands start without torch.
    sub.add_parser(
        "bench",
        help="end-to-end generation: peak memory, capacity and speed of KV caches "
        "(rotatekv bench --help)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; returns the exit status. Errors: one line, status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _run(argv)
    except UsageError as e:
        print(f"rotatekv: error: {e}", file=sys.stderr)
        raise
    except Exception as e:
        from .._rotatekv import RotateKVError

        if debug or not isinstance(e, RotateKVError | OSError):
            raise
        print(f"rotatekv: error: {e}", file=sys.stderr)
        raise UsageError(str(e)) from None


def _run(argv: list[str]) -> int:
    rest = [a for a in argv if a != "--debug"]
    if rest[:1] == ["bench"]:
        from . import bench

        return bench.main(rest[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.synthetic:
            from .demo import run_demo

            run_demo(context=args.context, batch=args.batch, repeats=args.repeats)
        else:
            from .model_demo import run_model_demo

            _positive("windows", args.windows)
            _positive("window-len", args.window_len)
            run_model_demo(
                windows=args.windows, window_len=args.window_len, progress=not args.quiet
            )
        return 0
    if args.command == "eval":
        return run_eval(args)
    if args.command == "calibrate":
        return run_calibrate(args)
    parser.print_help(sys.stderr)
    return 2
