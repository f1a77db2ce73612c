"""FOUL on the server: an on-server step from the history, then a short recovery.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795); spec
``shared/specs/foul_mpu.md`` Part A. The same algorithm and options as
:mod:`fed_unlearn.methods.foul`, with the defaults of its cheapest recipe:

1. ``mode="server"`` [P: "the server-side optimisation uses previously uploaded
   gradients", A.3 step 2; R: the rest]. No client is contacted while
   unlearning. The server takes the size-weighted remaining clients' and the
   departed clients' whole contributions from the FL history,
   g_u = -Σ_t (θ_t,u - θ_t), solves FOUL's conflict-averse dual once,
   Γ* = argmin_{Γ∈Δ} Γᵀb + κ‖g0‖·sqrt(ΓᵀGΓ), and steps θ_V ← θ_V - (η/R)·d,
   d = g0 + κ‖g0‖/‖g_Γ‖·g_Γ, for R = ``rounds`` steps at most, stopping on the
   T2F rule (a line search along d).
2. ``subnetwork="all"``: θ_V is the whole adapter. Nothing travels during the
   server step, so FOUL's byte argument for a small θ_V does not apply, and on
   both testbeds the whole adapter kept more utility than the top-25 % tensors.
3. ``recovery_rounds=1``, ``local_steps=2``, ``recovery_budget=1/12``,
   ``wire_dtype="float16"`` [R]: one FedAvg round of the remaining clients on
   their own data, adapters and deltas in fp16. The step of 1. removes the
   departed contribution but cannot teach what retraining teaches the remaining
   clients' data; this round does. Each client takes two local steps that
   together see 1/12 of the examples retraining would show it (FL rounds x
   local epochs x its items), so the round costs each client a twelfth of
   retraining's compute whatever the FL recipe: on SmolLM2 (3 rounds x 2
   epochs) two steps of 8 of its 30 items, on tiny (4 x 3) two steps of 15,
   one pass over its data. Two steps of the run's batch were too few on tiny:
   they see 8 of 30 items, and its utility then depended on which 8 (0.79-0.93x
   over ten data orders, mean 0.87x, against 0.92-0.98x, mean 0.96x, with the
   budget; two full-batch steps gave 1.01x at twice the cost).

Measured (3 clients, client 2 departs, against the cached ``none`` and
``retrain`` runs; wall time without the simulation's per-round curve
evaluation; README):

- SmolLM2-135M: 88 % of the forget-probability gap closed, model_utility
  0.98× retrain's, forget_quality 5.8e-6 → 0.071, wall time 0.07-0.11× (three
  runs; the machine's speed varies) and bytes 0.17× of retraining.
- tiny: 86 %, 0.96×, 2.4e-5 → 0.016, 0.08×, 0.13× (before the budget, two
  steps of the run's batch: 88 %, 0.93×, 0.06×).

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
    subnetwork : str
        Default ``"all"``.
    recovery_rounds : int
        Default 1.
    local_steps : int
        Default 2 (local steps of each remaining client in the recovery round).
    recovery_budget : float
        Default 1/12 (those steps see a twelfth of the examples retraining
        would show the client).
    wire_dtype : str
        Default ``"float16"``.
    """

    mode: str = "server"
    subnetwork: str = "all"
    recovery_rounds: int = 1
    local_steps: int = 2
    recovery_budget: float = 1 / 12
    wire_dtype: str = "float16"


class FoulServer(Foul):
    """FOUL's on-server step from the history, then one short recovery round."""

    summary = (
        "FOUL on the server: conflict-averse step from the history alone (no "
        "client contacted), then one fp16 recovery round of 2 steps sized to "
        "1/12 of retraining's client compute [P/R]"
    )
    config: FoulServerConfig
