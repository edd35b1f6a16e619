"""The README's code that users copy: the paged-kernels example runs as written."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> str:
    """The first ```python block under the ``## title`` heading."""
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    m = re.search(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert m, f"no python block under '## {title}'"
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
