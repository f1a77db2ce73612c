"""LoRA wrapping of a base model and access to its adapter tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fed_unlearn.models.base import ModelLoadError
from fed_unlearn.models.loading import load_base


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters.

    Parameters
    ----------
    r : int
        Rank (default: 8).
    alpha : int
        Scaling numerator; scaling = alpha / r (default: 16).
    dropout : float
        LoRA dropout (default: 0.0, so that local training is deterministic).
    target_modules : tuple[str, ...]
        Linear modules to adapt (default: all attention and MLP projections).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


_LORA: dict[tuple[str, LoraSpec], tuple[torch.nn.Module, object]] = {}


def load_lora_model(
    model_dir: str | Path, spec: LoraSpec, cache: bool = True
) -> tuple[torch.nn.Module, object]:
    """Load a base model and wrap it with a LoRA adapter (one copy per process).

    Only the adapter tensors are trainable. Use :func:`init_adapter` for a
    seed-determined initial adapter and ``model.disable_adapter()`` for the base.

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face directory of the base model.
    spec : LoraSpec
        LoRA hyper-parameters.
    cache : bool
        Reuse the process-wide copy for the same directory and spec.

    Returns
    -------
    tuple[peft.PeftModel, PreTrainedTokenizerBase]
        The adapted model (eval mode) and its tokenizer.
    """
    from peft import LoraConfig, get_peft_model

    key = (str(Path(model_dir).resolve()), spec)
    if cache and key in _LORA:
        return _LORA[key]
    base, tok = load_base(model_dir, cache=False)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, cfg)
    except ValueError as exc:
        raise ModelLoadError(f"cannot apply LoRA to {model_dir}: {exc}") from exc
    model.eval()
    if cache:
        _LORA[key] = (model, tok)
    return model, tok


def init_adapter(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Re-initialise the LoRA adapter from ``seed`` and return its state.

    Uses peft's own initialisation (Kaiming-uniform A, zero B), drawn from a
    seeded RNG, so the original run and the retrain oracle start identically.

    Parameters
    ----------
    model : peft.PeftModel
        Model returned by :func:`load_lora_model`.
    seed : int
        Initialisation seed.

    Returns
    -------
    dict[str, torch.Tensor]
        The adapter state (``get_peft_model_state_dict``), detached copies.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)
    finally:
        torch.random.set_rng_state(rng)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def get_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return detached copies of the model's LoRA adapter tensors.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.

    Returns
    -------
    dict[str, torch.Tensor]
        ``get_peft_model_state_dict`` keys -> fp32 tensors.
    """
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().clone().float()
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a peft model (strict: keys must match exactly).

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.
    state : dict[str, torch.Tensor]
        Adapter state as produced by :func:`get_adapter`.

    Raises
    ------
    ValueError
        If keys are missing or unexpected.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    got = set(state)
    if expected != got:
        missing = sorted(expected - got)[:3]
        extra = sorted(got - expected)[:3]
        raise ValueError(f"adapter keys differ: missing {missing}, unexpected {extra}")
    set_peft_model_state_dict(model, state)
