"""FOUL on the server: an on-server step from the history, then a short recovery.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795); spec
``shared/specs/foul_mpu.md`` Part A. The same algorithm and options as
:mod:`fed_unlearn.methods.foul`, with the defaults of its cheapest recipe:

1. ``mode="server"`` [P: "the server-side optimisation uses previously uploaded
   gradients", A.3 step 2; R: the rest]. No client is contacted while
   unlearning. The server takes the size-weighted remaining clients' and the
   departed clients' whole contributions from the FL history,
   g_u = -Σ_t (θ_t,u - θ_t), solves FOUL's conflict-averse dual once,
   Γ* = argmin_{Γ∈Δ} Γᵀb + κ‖g0‖·sqrt(ΓᵀGΓ), and steps θ_V ← θ_V - η·d,
   d = g0 + κ‖g0‖/‖g_Γ‖·g_Γ, in ``rounds`` equal steps (the curve's points).
2. ``server_step="share"``, ``server_lr=0.75`` [R]: the step's length follows
   from the history alone, η = 0.75 · ‖Σ_f p_f g_f‖ / ‖d‖, i.e. three
   quarters of the length of what the departed clients added to the global
   adapter under FedAvg (derivation in :mod:`fed_unlearn.methods.foul`). The
   scale was chosen on the ``calibration`` bench suite (its seeds are used by
   no evaluation suite): on it a full-length step (1.0) overshot the oracle's
   forgetting and cost the most utility, a half-length one (0.5) left too much
   of the gap.
3. ``subnetwork="all"``: θ_V is the whole adapter. Nothing travels during the
   server step, so FOUL's byte argument for a small θ_V does not apply.
4. ``recovery_rounds=1``, ``local_steps=2``, ``recovery_budget=1/6``,
   ``wire_dtype="float16"`` [R]: one FedAvg round of the remaining clients on
   their own data, adapters and deltas in fp16. The step of 1. removes the
   departed contribution but cannot teach what retraining teaches the remaining
   clients' data; this round does. Each client takes two local steps that
   together see 1/6 of the examples retraining would show it (FL rounds x
   local epochs x its items), so the round costs each client a sixth of
   retraining's compute whatever the FL recipe (1/6 rather than 1/12 kept more
   utility on the ``calibration`` suite at the same step).

Nothing here reads the retrain oracle or forget data: the defaults are what a
deployment runs (``stop="budget"``). Figures: the README and ``docs/results/``.

Only adapter tensors, metrics and configs cross the wire (the recovery round);
the server step reads nothing but the history it already holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_unlearn.methods.foul import Foul, FoulConfig


@dataclass(kw_only=True)
class FoulServerConfig(FoulConfig):
    """:class:`~fed_unlearn.methods.foul.FoulConfig` with the on-server defaults.

    Parameters
    ----------
    mode : str
        Default ``"server"`` (every gradient from the history).
    server_step : str
        Default ``"share"`` (the step's length from the history).
    server_lr : float
        Default 0.75 (scale of that length; ``calibration`` suite).
    subnetwork : str
        Default ``"all"``.
    recovery_rounds : int
        Default 1.
    local_steps : int
        Default 2 (local steps of each remaining client in the recovery round).
    recovery_budget : float
        Default 1/6 (those steps see a sixth of the examples retraining
        would show the client).
    wire_dtype : str
        Default ``"float16"``.
    """

    mode: str = "server"
    server_step: str = "share"
    server_lr: float = 0.75
    subnetwork: str = "all"
    recovery_rounds: int = 1
    local_steps: int = 2
    recovery_budget: float = 1 / 6
    wire_dtype: str = "float16"


class FoulServer(Foul):
    """FOUL's on-server step from the history, then one short recovery round."""

    summary = (
        "FOUL on the server: conflict-averse step from the history alone, as "
        "long as 3/4 of the departed clients' share of the update (no client "
        "contacted), then one fp16 recovery round of 2 steps sized to 1/6 of "
        "retraining's client compute [P/R]"
    )
    config: FoulServerConfig
