"""The command line as a user meets it: help, version, and bad arguments answered in one
line, fast, before torch or a model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import rotatekv


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rotatekv", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rotatekv {rotatekv.__version__}"
    r = run("--help")
    assert r.returncode == 0
    assert "``" not in r.stdout and "rotatekv: packed 2-bit" in r.stdout
    r = run("eval", "--help")
    assert "(default: 16)" in r.stdout and "(default: both)" in r.stdout


def _parsers():
    """The top-level parser, each subcommand's, and ``rotatekv bench``'s."""
    import argparse

    from rotatekv.tools import bench, cli

    top = cli._parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    yield "rotatekv", top
    for name, p in subs.choices.items():
        if name != "bench":
            yield f"rotatekv {name}", p
    b = argparse.ArgumentParser(prog="rotatekv bench")
    bench.add_args(b)
    yield "rotatekv bench", b


def test_every_option_has_help_and_quiet():
    for prog, p in _parsers():
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                assert a.help and a.help.strip(), f"{prog} {a.option_strings[0]}: no help"
        opts = {o for a in p._actions for o in a.option_strings}
        if prog != "rotatekv":
            assert "--quiet" in opts, f"{prog}: no --quiet"


def test_quiet_silences_progress(tmp_path, monkeypatch):
    """``--quiet`` turns every progress bar off; without it the same run shows them."""
    from rotatekv.tools import cli, model_demo

    seen = []
    monkeypatch.setattr(model_demo, "run_model_demo", lambda **kw: seen.append(kw["progress"]))
    assert cli.main(["demo", "--windows", "1"]) == 0
    assert cli.main(["demo", "--windows", "1", "--quiet"]) == 0
    assert seen == [True, False]


@pytest.mark.parametrize(
    "args,word",
    [
        (("eval", "--methods", "bogus"), "methods"),
        (("eval", "--windows", "0"), "--windows"),
        (("calibrate", "--out", "x.safetensors", "--windows", "-1"), "--windows"),
        (("eval", "--model", "/nonexistent/model.gguf", "--methods", "fp16"), "not found"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_arguments_fail_in_one_line(args, word):
    t0 = time.perf_counter()
    r = run(*args)
    took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("rotatekv") and word in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    if "--model" not in args:
        assert took < 10, took  # no torch import before the arguments are checked


def test_debug_shows_the_traceback():
    r = run("--debug", "eval", "--methods", "bogus")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ArgumentError" in r.stderr


def test_import_and_store_without_torch(tmp_path):
    """`import rotatekv` and a numpy-only store work where torch is not installed (a meta
    path hook refuses torch, as a clean environment would)."""
    code = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
import numpy as np
import rotatekv
from rotatekv import KVStore, QuantConfig
s = KVStore(1, 2, 64, config=QuantConfig(bits=2))
k = np.random.default_rng(0).standard_normal((1, 2, 70, 64)).astype(np.float32)
s.append(0, k, k)
out = s.attend(0, np.ones((1, 8, 1, 64), np.float32))
assert out.shape == (1, 8, 1, 64) and "torch" not in sys.modules
print("ok", rotatekv.__version__)
"""
    env = dict(os.environ)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
    # The command line too: its help needs no torch either.
    cli = code.split("import numpy as np")[0]
    cli += "from rotatekv.tools.cli import main\nmain(['--help'])\n"
    r = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: rotatekv" in r.stdout, r.stderr
