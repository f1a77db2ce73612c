"""What scoring and generation need to know of a model's forward and KV-cache API.

The prompt-shared scorer (:mod:`~fed_unlearn.metrics.scoring`) feeds answers as
continuations of a prompt's KV cache; these helpers find the model's device,
which arguments its forward takes (the cache argument was renamed in
transformers 5.24), whether it can share prompts at all, and copy rows of a
cache.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """Return the device of ``model``'s first parameter (CPU when it has none).

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    torch.device
        Where its inputs go.
    """
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def forward_params(model: Any) -> Any:
    """Return the parameters of the (base) model's ``forward`` signature.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM, possibly peft-wrapped (its base model's forward counts).

    Returns
    -------
    Mapping[str, inspect.Parameter]
        Name -> parameter; empty when the signature cannot be read.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return {}


def accepts(model: Any, name: str) -> bool:
    """Whether ``model``'s forward takes an argument called ``name``.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM.
    name : str
        Argument name.

    Returns
    -------
    bool
        True if :func:`forward_params` lists it.
    """
    return name in forward_params(model)


def sharing_blockers(model: Any) -> tuple[bool, str]:
    """Why ``model`` cannot score answers as continuations of a prompt KV cache.

    Returns ``(by_design, missing)``: ``by_design`` for an encoder-decoder or a
    virtual-token / input-dependent adapter (not a prefix cache), ``missing``
    naming the forward arguments the model lacks (``""`` when it has them).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return True, ""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and (
        getattr(peft_cfg, "is_prompt_learning", False)
        or getattr(peft_cfg, "alora_invocation_tokens", None)
    ):
        return True, ""
    params = forward_params(model)
    need = [cache_kwarg(model), "position_ids"]
    missing = [n for n in need if n not in params]
    if not missing:
        return False, ""
    return False, "its forward takes no " + " / ".join(missing)


def cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is
    a deprecated alias, in the forward's kwargs and in its outputs).
    """
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def output_cache(out: Any) -> Any:
    """Return the KV cache of a forward's output, under either of its names."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def cache_supported(cache: Any, width: int) -> bool:
    """Only growable full-attention caches (or sliding windows >= ``width`` tokens).

    ``width`` bounds the padded prompt + answer length, so a sliding window that
    wide never drops a token and behaves as full attention (as in the full pass,
    whose sequences are shorter still).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - very old transformers
        return False
    if type(cache) is not DynamicCache or not cache.layers:
        return False
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            continue
        window = getattr(layer, "sliding_window", None)
        if not isinstance(layer, DynamicLayer) or window is None:
            return False
        if int(window) < width:  # answers would need more context than it keeps
            return False
    return True


def select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """Return a new cache holding ``rows`` of ``cache`` (left untouched)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(rows)
    return new
