"""Optimisers of the unlearning loop: SophiaG (SOUL's variant) and entry masks.

SophiaG as in SOUL's code (``OPTML-Group/SOUL``; spec ``methods.md`` §1.1
Stage 2) [V]. Per parameter, every step, with the minibatch gradient ``g``::

    h ← β2·h + (1−β2)·g⊙g                  # curvature proxy, refreshed every step
    θ ← θ·(1 − lr·wd)                       # decoupled weight decay
    m ← β1·m + (1−β1)·g
    θ ← θ − lr · sign(m) · min(|m| / (ρ·bs·h + 1e−15), 1)

No bias correction and no label resampling (the Sophia paper's GNB/Hutchinson
estimator refreshed every k steps is *not* what SOUL runs). ``bs`` is the
constant of SOUL's ``step(bs=5120)``.

:class:`MaskedOptimizer` keeps the entries a 0/1 mask leaves out bit-identical
whatever the wrapped optimiser does to them (weight decay included): it restores
them after every step. :func:`entry_grad_masks` zeroes their gradients first, so
that gradient clipping and the optimiser's statistics see only the selected
entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "MaskedOptimizer",
    "SophiaG",
    "entry_grad_masks",
    "make_optimizer",
]

#: Names of the optimisers :func:`make_optimizer` builds.
OPTIMIZERS = ("adamw", "sophia")
#: SophiaG defaults: SOUL's TOFU betas and ρ, its ``bs`` constant [V].
SOPHIA_DEFAULTS = {"beta1": 0.9, "beta2": 0.95, "rho": 0.04, "bs": 5120.0}


class SophiaG(torch.optim.Optimizer):
    """SophiaG with the diagonal curvature ``h`` from ``g⊙g`` every step (SOUL).

    Parameters
    ----------
    params : Iterable
        Parameters or parameter groups.
    lr : float
        Step size (the largest change of one entry per step, before decay).
    betas : tuple[float, float]
        ``(β1, β2)``: momentum and curvature EMA factors (default: SOUL's TOFU
        ``(0.9, 0.95)``).
    rho : float
        ρ of the clipped step (default: 0.04).
    weight_decay : float
        Decoupled weight decay ``wd`` (default: 0.0; SOUL used 0.1 on full
        weights).
    bs : float
        The step's ``bs`` constant (default: 5120, SOUL's).

    Raises
    ------
    ValueError
        A non-positive ``lr``, ``rho`` or ``bs``, betas outside ``[0, 1)`` or a
        negative weight decay.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        rho: float = 0.04,
        weight_decay: float = 0.0,
        bs: float = 5120.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"SophiaG: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SophiaG: betas must be in [0, 1), got {betas}")
        if not rho > 0 or not bs > 0:
            raise ValueError(f"SophiaG: rho and bs must be > 0, got {rho}, {bs}")
        if weight_decay < 0:
            raise ValueError(f"SophiaG: weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "weight_decay": weight_decay,
            "bs": bs,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one SophiaG step (module docstring) on every parameter with a grad.

        Parameters
        ----------
        closure : Callable, optional
            Re-evaluates the loss (called with grad enabled), as in torch.

        Returns
        -------
        Any
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            scale = group["rho"] * group["bs"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["hessian"] = torch.zeros_like(p)
                m, h = state["exp_avg"], state["hessian"]
                state["step"] += 1
                h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - lr * wd)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                ratio = (m.abs() / (scale * h + 1e-15)).clamp(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-lr)
        return loss


class MaskedOptimizer:
    """Wrap an optimiser so that masked-out entries never change.

    After every :meth:`step` each masked parameter's entries where its mask is
    False are copied back from the values they had when the wrapper was made,
    so they stay bit-identical (weight decay and momentum included).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimiser of the trainable parameters.
    masks : Mapping[torch.nn.Parameter, torch.Tensor]
        Parameter -> boolean mask of its shape (True = may change). Parameters
        without a mask change freely.

    Raises
    ------
    ValueError
        A mask whose shape differs from its parameter's.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        masks: Mapping[torch.nn.Parameter, torch.Tensor],
    ) -> None:
        for p, mask in masks.items():
            if mask.shape != p.shape:
                raise ValueError(
                    f"MaskedOptimizer: a mask of shape {tuple(mask.shape)} for a "
                    f"parameter of shape {tuple(p.shape)}"
                )
        self.optimizer = optimizer
        self.masks = [
            (p, m.to(device=p.device, dtype=torch.bool)) for p, m in masks.items()
        ]
        self.frozen = [p.detach().clone() for p, _ in self.masks]

    @torch.no_grad()
    def step(self) -> None:
        """Step the wrapped optimiser, then restore the masked-out entries."""
        self.optimizer.step()
        for (p, mask), keep in zip(self.masks, self.frozen, strict=True):
            p.copy_(torch.where(mask, p, keep))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimiser's gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)


@contextlib.contextmanager
def entry_grad_masks(
    masks: Mapping[torch.nn.Parameter, torch.Tensor],
) -> Iterator[None]:
    """Multiply each masked parameter's gradient by its 0/1 mask while active.

    Parameters
    ----------
    masks : Mapping[torch.nn.Parameter, torch.Tensor]
        Parameter -> boolean mask of its shape (True = keeps its gradient).
    """
    handles = []
    for p, mask in masks.items():
        m = mask.to(device=p.device, dtype=p.dtype)
        handles.append(p.register_hook(lambda g, m=m: g * m))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    sophia: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """Build a named optimiser of the unlearning loop.

    Parameters
    ----------
    name : str
        ``"adamw"`` (torch's AdamW, the loop's default) or ``"sophia"``
        (:class:`SophiaG`).
    params : list[torch.nn.Parameter]
        Trainable parameters.
    lr : float
        Learning rate.
    weight_decay : float
        Decoupled weight decay of either optimiser (default: 0.0).
    sophia : Mapping[str, float], optional
        Overrides of :data:`SOPHIA_DEFAULTS` (``beta1``, ``beta2``, ``rho``,
        ``bs``); only with ``"sophia"``.

    Returns
    -------
    torch.optim.Optimizer
        The optimiser.

    Raises
    ------
    ValueError
        Unknown name or Sophia parameter, or Sophia parameters for AdamW.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    given = dict(sophia or {})
    if name == "adamw":
        if given:
            raise ValueError(
                f"optimizer 'adamw' takes no Sophia parameters, got {sorted(given)}"
            )
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    unknown = sorted(set(given) - set(SOPHIA_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown Sophia parameter(s) {unknown}; valid: {sorted(SOPHIA_DEFAULTS)}"
        )
    hp = {**SOPHIA_DEFAULTS, **given}
    return SophiaG(
        params,
        lr=lr,
        betas=(hp["beta1"], hp["beta2"]),
        rho=hp["rho"],
        weight_decay=weight_decay,
        bs=hp["bs"],
    )
