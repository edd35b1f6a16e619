"""The README's code that users copy runs as written (quick start, paged kernels)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str, lang: str = "python") -> str:
    """The first ```lang block under the ``## title`` heading."""
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    m = re.search(rf"```{lang}\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert m, f"no {lang} block under '## {title}'"
    return m.group(1)


def test_paged_kernels_example_runs_and_reports():
    code = section_code("Paged kernels: caller-owned memory")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "9216 bytes per block, 2.25 bits per element", lines
    cosine = float(lines[1].rsplit(" ", 1)[1])
    # 2-bit keys and values of Gaussian noise: close to attention over fp32 K/V, not equal.
    assert 0.8 < cosine < 1.0, lines


def test_quick_start_runs_and_reports():
    code = section_code("Quick start")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    lens, nbytes, bits = out.getvalue().split(maxsplit=2)
    assert lens == "[1000]" and int(nbytes) > 0, out.getvalue()
    # 2-bit codes with fp16 scales and zeros per 128 channels, positions counted.
    assert 2.0 < float(bits) < 2.5, out.getvalue()


def test_readme_is_a_front_page():
    # Dated measurements and lab notes live under docs/; the README links them.
    assert len(README.read_text().splitlines()) < 300


def test_transformers_example_generates_text(capsys):
    """The transformers example as written: calibrate on the packaged model, generate with
    the 2-bit cache, print the text; the model is back to itself afterwards."""
    import pytest

    pytest.importorskip("gguf")
    code = section_code("On a transformers model")
    env: dict = {}
    exec(compile(code, str(README), "exec"), env)
    text = capsys.readouterr().out.strip().splitlines()[-1]
    assert text.startswith("The history of"), text
    # A continuation of words, not a repeated token or noise.
    words = text.split()
    assert len(words) >= 25 and len(set(words)) >= 15, text
    assert not hasattr(env["model"], "_rotatekv_state")


def test_command_line_block_parses():
    """Every command of the README's command-line block exists with the options shown:
    each runs with ``--help`` appended (``--version`` as written)."""
    import shlex

    import pytest

    from rotatekv.tools.cli import main

    lines = [x.split("#")[0].strip() for x in section_code("Command line", "sh").splitlines()]
    cmds = [shlex.split(x) for x in lines if x]
    assert cmds and all(c[0] == "rotatekv" for c in cmds), cmds
    for c in cmds:
        with pytest.raises(SystemExit) as e:
            main(c[1:] if c[1:] == ["--version"] else [*c[1:], "--help"])
        assert e.value.code == 0, c
