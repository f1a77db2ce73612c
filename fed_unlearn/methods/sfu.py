"""SFU: the departed clients' ascent update, projected off the others' input subspace.

Paper: Li, Shen, Sun, Hu, Hu, Tao, "Subspace based Federated Unlearning",
arXiv 2302.12448 (TMLR). Spec: ``shared/specs/methods.md`` §2.6. No history:
one round of communication, then optional post-training.

1. Representations, as an aggregate [R: our privacy floor]: the paper's
   remaining client k sends its layer inputs R_k^l = [λ_i x_i^l]_i (per-token
   representations, each scaled by a random λ_i > 0) [V]. Those are per-example
   values, which never leave a client here. Instead each remaining client sends,
   per adapted layer l, the Gram matrix G_k^l = Σ_i λ_i x_i^l x_i^lᵀ over every
   non-padding token of (up to ``max_items`` of) its items, λ_i ~ U(0, 1] drawn
   and kept by the client (the ``layer-grams`` request,
   :mod:`fed_unlearn.subspace`); x_i^l is the token's input to layer l's LoRA A,
   with the current global adapter loaded.
2. Basis [V]: the server sums G^l = Σ_k G_k^l = R^l R^lᵀ for R^l the stacked
   scaled inputs √λ_i x_i of all remaining clients, and eigendecomposes it: its
   eigenvectors are R^l's left singular vectors, its eigenvalues the squared
   singular values. U_k^l keeps the smallest k with ‖(R^l)_k‖_F² ≥ ε‖R^l‖_F²
   (ε = ``energy``): the SVD basis the paper builds from the stacked R^l.
3. Ascent [V, R budget]: each departed client runs ``local_epochs`` epochs of
   gradient ascent (the ``ga`` inner loss, a fresh AdamW) on its own items from
   the global adapter θ and returns its update; the server sums them (disjoint
   forget sets).
4. Projection on LoRA A [R: the spec's LoRA mapping of G̃ = G − G U Uᵀ]: inputs
   enter ΔW = BA through A, so ΔA ← ΔA (I − U_k U_kᵀ) and (B A + B ΔA) x = B A x
   for the remaining clients' inputs x in span(U_k). With ``b_update="drop"``
   (default) only A ascends (B is frozen on the client) and that identity holds
   for the whole update [R]; ``"keep"`` also applies B's ascent update,
   unprojected.
5. θ ← θ + ``server_lr`` · (ΔÃ, ΔB) [V: w ← w − (g − g̃)], then
   ``recovery_rounds`` FedAvg rounds of the remaining clients [P: optional].

What crosses the wire: to the remaining clients the global adapter, and back
one d_in × d_in matrix per adapted layer summed over at least ``min-examples``
items' tokens (never a token's representation); to the departed clients the
global adapter, and their deltas back. How much a Gram matrix reveals about a
client's items: ``docs/methods/sfu.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.methods.base import (
    RUN_LR,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.rounds import (
    RoundLog,
    check_positive,
    copy_deltas,
    recovery_rounds,
)
from fed_unlearn.protocol import LayerGramReply, LayerGramRequest, LocalUpdateRequest
from fed_unlearn.subspace import LORA_A, energy_basis, project_off
from fed_unlearn.training import NO_CAP
from fed_unlearn.types import AdapterState, ClientId

B_UPDATES = ("drop", "keep")


@dataclass(kw_only=True)
class SFUConfig(UnlearnConfig):
    """SFU options.

    Parameters
    ----------
    energy : float
        ε^l, the share of each layer's input energy the basis keeps, in (0, 1]
        (default: 0.97; the paper's GPM-style range is 0.95-0.99) [P].
    max_items : int
        Items each remaining client forwards for its Gram matrices; 0 = all
        (default: 0) [R].
    local_epochs : int
        Ascent epochs of a departed client (default: 1) [R].
    local_steps : int
        Cap on its ascent steps; 0 = none (default: 0).
    lr : float
        Ascent learning rate; 0 (``RUN_LR``) = ``lr_scale`` x the run's
        (default: 0).
    lr_scale : float
        Ascent rate relative to the FL one when ``lr`` is 0 (default: 0.1, as
        MPU's inner loss) [R].
    b_update : str
        ``"drop"``: only LoRA A ascends, so the whole update is off the
        remaining clients' input subspace; ``"keep"``: B's ascent update is
        applied too, unprojected (default: ``"drop"``) [R].
    server_lr : float
        Factor on the projected update (default: 1.0) [V].
    recovery_rounds : int
        Post-training FedAvg rounds of the remaining clients (default: 0) [P].
    """

    energy: float = 0.97
    max_items: int = 0
    local_epochs: int = 1
    local_steps: int = 0
    lr: float = RUN_LR
    lr_scale: float = 0.1
    b_update: str = "drop"
    server_lr: float = 1.0
    recovery_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        for name in ("max_items", "local_steps", "recovery_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if not (self.lr >= RUN_LR and math.isfinite(self.lr)):
            raise ValueError(f"lr must be >= 0 (0 = the run's), got {self.lr}")
        check_positive(lr_scale=self.lr_scale, server_lr=self.server_lr)
        if self.b_update not in B_UPDATES:
            raise ValueError(
                f"b_update must be one of {B_UPDATES}, got {self.b_update!r}"
            )


def summed_grams(
    replies: Mapping[ClientId, LayerGramReply], theta: AdapterState
) -> dict[str, torch.Tensor]:
    """Validate the clients' Gram matrices and sum them per layer (float64).

    Parameters
    ----------
    replies : Mapping[ClientId, LayerGramReply]
        The remaining clients' ``layer-grams`` replies.
    theta : AdapterState
        The adapter sent: one ``d_in x d_in`` matrix is due per ``lora_A``
        tensor (``r x d_in``).

    Returns
    -------
    dict[str, torch.Tensor]
        ``lora_A`` key -> Σ_k G_k.

    Raises
    ------
    ValueError
        No reply, or a reply with other keys, a wrong shape, a non-finite or
        asymmetric matrix (naming the client).
    """
    want = {k: (v.shape[1], v.shape[1]) for k, v in theta.items() if LORA_A in k}
    if not want:
        raise ValueError("sfu: the adapter has no LoRA A tensors")
    if not replies:
        raise ValueError("sfu: no remaining client sent its Gram matrices")
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in want.items()}
    for cid, rep in sorted(replies.items()):
        got = set(rep.grams)
        if got != set(want):
            extra, missing = sorted(got - set(want)), sorted(set(want) - got)
            raise ValueError(
                f"sfu: client {cid}'s Gram matrices do not match the adapter's "
                f"LoRA A tensors (unexpected {extra[:2]}, missing {missing[:2]})"
            )
        for k, g in rep.grams.items():
            if tuple(g.shape) != want[k]:
                raise ValueError(
                    f"sfu: client {cid}'s Gram matrix of {k} has shape "
                    f"{tuple(g.shape)}, want {want[k]}"
                )
            g = g.double()
            if not torch.isfinite(g).all():
                raise ValueError(
                    f"sfu: client {cid}'s Gram matrix of {k} is not finite"
                )
            if not torch.allclose(g, g.T, rtol=1e-4, atol=1e-6 * float(g.abs().max())):
                raise ValueError(
                    f"sfu: client {cid}'s Gram matrix of {k} is not symmetric"
                )
            total[k] += g
    return total


class SFU(UnlearningMethod):
    """Gradient ascent of the departed clients off the remaining input subspace."""

    summary = (
        "SFU: the departed client's gradient-ascent update on LoRA A, projected "
        "off the remaining clients' layer-input subspace, built from their "
        "summed Gram matrices [V/R]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: SFUConfig

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run steps 1-5 of the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta = {k: v.float().clone() for k, v in ctx.trained.items()}
        log = RoundLog(ctx, "budget")
        log.start(theta)
        grams = ctx.clients.query(
            dict.fromkeys(
                ctx.remaining, LayerGramRequest(theta, max_items=cfg.max_items)
            )
        )
        t0 = time.perf_counter()
        bases = {
            k: energy_basis(g, cfg.energy)
            for k, g in summed_grams(grams, theta).items()
        }
        server_s = time.perf_counter() - t0
        a_keys = set(bases)
        copy = theta if cfg.b_update == "keep" else {k: theta[k] for k in a_keys}
        request = LocalUpdateRequest(
            copies=[copy],
            base={} if cfg.b_update == "keep" else theta,
            loss="ga",
            epochs=cfg.local_epochs,
            max_steps=cfg.local_steps if cfg.local_steps else NO_CAP,
            lr=cfg.lr if cfg.lr != RUN_LR else None,
            lr_scale=cfg.lr_scale,
            seed_round=seeds.SFU + 1,
        )
        replies = ctx.clients.query(dict.fromkeys(ctx.departed, request))
        log.add_compute(replies)
        t0 = time.perf_counter()
        step: AdapterState | None = None
        for d, _ in copy_deltas(replies, copy, self.name).values():
            step = d if step is None else ad.add(step, d)
        assert step is not None
        kept: dict[str, float] = {}
        for k in a_keys:
            before = float(step[k].double().norm())
            step[k] = project_off(step[k], bases[k])
            kept[k] = float(step[k].double().norm()) / before if before > 0 else 0.0
        full = {k: step.get(k, torch.zeros_like(v)) for k, v in theta.items()}
        theta = ad.add(theta, ad.scale(full, cfg.server_lr))
        server_s += time.perf_counter() - t0
        log.end_round(1, theta, {"stage": "unlearn"})
        theta = recovery_rounds(ctx, theta, cfg.recovery_rounds, log, 1, self.name)
        dims = sorted(int(b.shape[1]) for b in bases.values())
        info = log.info(
            basis_dims={
                "min": dims[0],
                "median": dims[len(dims) // 2],
                "max": dims[-1],
            },
            projected_norm_kept=sum(kept.values()) / len(kept),
            gram_items=sum(r.num_examples for r in grams.values()),
            gram_tokens=sum(r.tokens for r in grams.values()),
            b_update=cfg.b_update,
            recovery_rounds=cfg.recovery_rounds,
            server_step_seconds=server_s,
        )
        return UnlearnResult(theta, rounds=1 + cfg.recovery_rounds, info=info)
