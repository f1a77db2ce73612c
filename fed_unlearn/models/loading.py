"""Resolving a preset or a path to a model directory, and loading the base model.

Three ways to get a base model (all offline once cached): the ``smollm2`` preset
(:mod:`~fed_unlearn.models.smollm2`), the ``tiny`` preset
(:mod:`~fed_unlearn.models.tiny`), or ``model_path``, any local Hugging Face
causal-LM directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fed_unlearn.models.base import ModelLoadError
from fed_unlearn.models.smollm2 import SMOLLM2_GGUF, smollm2_dir
from fed_unlearn.models.tiny import TinySpec, tiny_dir

PRESETS = ("smollm2", "tiny")


def resolve_model_dir(preset: str | None, model_path: str | None = None) -> Path:
    """Map a preset name or a local path to a Hugging Face model directory.

    Parameters
    ----------
    preset : str, optional
        ``"smollm2"`` or ``"tiny"``; ignored when ``model_path`` is given.
    model_path : str, optional
        Local Hugging Face causal-LM directory.

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    ModelLoadError
        Unknown preset or missing directory.
    """
    if model_path:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {model_path}: no config.json in that directory"
            )
        return path
    if preset == "smollm2":
        return smollm2_dir()
    if preset == "tiny":
        return tiny_dir()
    raise ModelLoadError(
        f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
    )


def model_identity(preset: str | None, model_path: str | None = None) -> str:
    """Return a string that changes whenever the base model changes (cache keys).

    Parameters
    ----------
    preset : str, optional
        Preset name.
    model_path : str, optional
        Local model directory (its path and the mtime of its weights count).

    Returns
    -------
    str
        E.g. ``"tiny-<recipe hash>"`` or ``"smollm2-<gguf name>"``.
    """
    if model_path:
        path = Path(model_path).expanduser().resolve()
        stamp = max(
            (f.stat().st_mtime_ns for f in path.glob("*") if f.is_file()), default=0
        )
        return f"path:{path}:{stamp}"
    if preset == "tiny":
        return f"tiny-{TinySpec().key()}"
    return f"{preset}-{SMOLLM2_GGUF}"


_LOADED: dict[str, tuple[torch.nn.Module, object]] = {}


def load_base(
    model_dir: str | Path, cache: bool = True
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer (fp32, eval mode, frozen).

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face directory.
    cache : bool
        Keep one copy per process (clients of one Ray worker share it).

    Returns
    -------
    tuple[torch.nn.Module, PreTrainedTokenizerBase]
        Model and tokenizer (pad token set; ``padding_side`` right).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(Path(model_dir).resolve())
    if cache and key in _LOADED:
        return _LOADED[key]
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load a causal LM from {model_dir}: {exc}"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cache:
        _LOADED[key] = (model, tok)
    return model, tok
