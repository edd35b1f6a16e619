"""Evaluation and calibration text: Wikipedia articles from gensim's test data, cleaned, cut
into token windows."""

from __future__ import annotations

import bz2
import os
import re
from pathlib import Path
from typing import Any

import torch

from .._rotatekv import ArgumentError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_JUNK_LINE = re.compile(r"^\s*(\||!|\{|\}|thumb|File:|Image:|Category:).*$", re.M | re.I)
_BLANKS = re.compile(r"\n{3,}")


def wikipedia_articles() -> list[str]:
    """The articles of the Wikipedia dump shipped in the gensim wheel, wiki markup removed
    (gensim's ``filter_wiki``, then quotes, headings and table/file lines), in dump order."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(os.path.dirname(gensim.__file__)) / "test" / "test_data" / WIKI_DUMP
    if not path.is_file():
        raise ArgumentError(f"text: expected gensim's Wikipedia test dump at {path}")
    out = []
    with bz2.BZ2File(path) as f:
        for _title, raw, _pid in extract_pages(f, filter_namespaces=("0",)):
            if raw.lower().startswith("#redirect"):
                continue
            t = filter_wiki(raw)
            t = _QUOTES.sub("", t)
            t = _HEADING.sub(r"\1", t)
            t = _JUNK_LINE.sub("", t)
            t = _BLANKS.sub("\n\n", t).strip()
            if len(t) > 200:
                out.append(t)
    return out


def load_texts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Documents of a UTF-8 file (split at blank-line runs of 3+ lines, i.e. one document per
    file unless separated), or the cleaned Wikipedia articles by default."""
    if path is None:
        return wikipedia_articles()
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArgumentError(f"text: expected a readable UTF-8 file, got {str(p)!r}: {e}") from e
    docs = [d.strip() for d in re.split(r"\n\s*\n\s*\n", raw) if d.strip()]
    if not docs:
        raise ArgumentError(f"text: {str(p)!r} holds no text")
    return docs


def boundary_token(tokenizer: Any) -> int | None:
    """The token a document starts with: BOS when the tokenizer adds one, otherwise the
    end-of-text separator the model was pretrained with (``<|endoftext|>``), if any."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return tid
    if tokenizer.unk_token == "<|endoftext|>":
        return int(tokenizer.unk_token_id)
    return int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None


def token_stream(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """All documents tokenized and joined, each preceded by the boundary token."""
    b = boundary_token(tokenizer)
    ids: list[int] = []
    for d in docs:
        if b is not None:
            ids.append(b)
        ids.extend(tokenizer(d, add_special_tokens=False).input_ids)
    return torch.tensor(ids, dtype=torch.int64)


def split_windows(
    tokenizer: Any,
    docs: list[str],
    n_eval: int,
    n_calib: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eval [n_eval, length], calib [n_calib, length])`` of non-overlapping windows of the
    token stream: evaluation windows from the front, calibration windows from the back, so
    the two never share text. Each window starts with the boundary token (a model's first
    position is its attention sink; a window cut mid-document otherwise starts anywhere)."""
    stream = token_stream(tokenizer, docs)
    b = boundary_token(tokenizer)
    body = length - (1 if b is not None else 0)
    need = (n_eval + n_calib) * body + 1
    if need > stream.numel():
        raise ArgumentError(
            f"windows: {n_eval} + {n_calib} windows of {length} tokens need {need} tokens of "
            f"text, the text has {stream.numel()}"
        )

    def cut(start: int) -> torch.Tensor:
        w = stream[start : start + body]
        if b is not None and int(w[0]) == b:  # a window that starts a document
            w = stream[start + 1 : start + 1 + body]
        return torch.cat([torch.tensor([b]), w]) if b is not None else w

    ev = [cut(i * body) for i in range(n_eval)]
    end = stream.numel()
    ca = [cut(end - (i + 1) * body) for i in range(n_calib)]
    empty = torch.empty(0, length, dtype=torch.int64)
    return (
        torch.stack(ev) if ev else empty,
        torch.stack(ca) if ca else empty,
    )
