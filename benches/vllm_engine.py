"""What the vLLM benchmarks share: one engine per configuration, each in its own process of
``.venv-vllm`` (vLLM keeps its backend choice per process), reporting one ``RESULT`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VPY = ROOT / ".venv-vllm" / "bin" / "python"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(msg: str) -> None:
    """From inside an engine run: a line the parent shows as it comes."""
    print(f"PROGRESS {msg}", flush=True)


def engine(script: str, args: list[str], config: object, plugin: bool = True) -> dict:
    """Runs ``script run ARGS CONFIG_JSON`` in ``.venv-vllm``; ``plugin=False`` keeps vLLM
    from loading rotatekv at all. Shows the run's ``progress`` lines as they come; returns
    its ``RESULT`` object; exits on failure with the engine's output."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("ROTATEKV_VLLM", None)
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(
            [str(VPY), script, "run", *args, json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        assert p.stdout is not None
        out = []
        for line in p.stdout:
            out.append(line)
            if line.startswith("PROGRESS "):
                log("  " + line[len("PROGRESS ") :].rstrip())
        p.wait()
        err.seek(0)
        stderr = err.read()
    lines = [x for x in out if x.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"vLLM run {config} failed:\n{''.join(out)[-2000:]}\n{stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
