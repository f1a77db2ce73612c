"""FOUL on the server: a step from the history alone, then an optional short recovery.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795); spec
``shared/specs/foul_mpu.md`` Part A. The same algorithm and options as
:mod:`fed_unlearn.methods.foul.method`, with the defaults of its cheapest recipe.
Where the calibrated default depends on the base model, the one below is a
pretrained base's (SmolLM2, or any ``model-path``), and the ``tiny`` preset's
differs (:data:`fed_unlearn.config.PRESET_METHOD_DEFAULTS`; ``run.json``
records what a run resolved):

1. ``mode="server"`` [P: "the server-side optimisation uses previously uploaded
   gradients", A.3 step 2; R: the rest]. The server takes every client's
   whole contribution from the FL history, g_u = -Σ_t (θ_t,u - θ_t), with
   FedAvg weights p_u = n_u / Σ n.
2. ``server_direction="remove"``, ``server_lr=1.0`` [R]: the step takes back
   what the departed clients added to the global adapter under FedAvg,
   θ ← θ + server_lr · Σ_f p_f g_f (derivation in
   :mod:`fed_unlearn.methods.foul.method`), in ``rounds`` equal steps (the
   curve's points). Under a server-optimiser strategy (``strategy`` FedAdam,
   FedYogi, FedAdagrad, FedAvgM) the global step is not the average of the
   client deltas; there [R] the share is θ_T minus where that Flower strategy
   ends when replayed on the recorded rounds with the departed clients' terms
   taken out of each average
   (:func:`fed_unlearn.methods.foul.method.replayed_contribution`; under FedAvg
   it is the share above exactly). The factors below were calibrated under
   FedAvg only.
3. ``recovery_rounds=0`` [R]: no client is contacted at all; nothing crosses
   the wire. With ``recovery_rounds=1`` the remaining clients run one FedAvg
   round on their own data, ``local_steps=2`` steps that together see
   ``recovery_budget=1/6`` of the examples retraining would show each (FL
   rounds x local epochs x its items), adapters and deltas in
   ``wire_dtype="float16"``: a sixth of retraining's client compute whatever
   the FL recipe.
4. ``subnetwork="all"``: θ_V is the whole adapter. Nothing travels during the
   server step, so FOUL's byte argument for a small θ_V does not apply.

How the step and the recovery were chosen, on the ``calibration`` suite (seeds
1000-1002; no evaluation suite uses them):

* A pretrained base, on its ``smollm2-5c`` scenario (SmolLM2-135M-Instruct,
  seeds 1000-1001): the whole share without a recovery round closed the gap
  nearest to the oracle at the retrain's utility, among 0.5, 0.75 and 1 with
  the recovery round and 0.75 and 1 without it; the recovery round bought no
  utility there. So the step needs no factor and no client.
* The ``tiny`` preset (its base trained from scratch on the synthetic facts;
  ``server_lr=0.5``, ``recovery_rounds=1``), on its ``tiny-*`` scenarios over
  0.4-0.6 and 1-4: there the whole share overshot the oracle's forgetting,
  because the later rounds' updates of the other clients were computed on a
  model that held the departed contribution and carry part of it too; half
  of it, with the recovery round, closed the gap.
* FOUL's conflict-averse direction (``server_direction="foul"``) stays
  available, but on whole-run contributions it is dominated by the retain
  mean g0: its result did not change with κ (0.75, 2 and 5 gave the same
  adapter up to rounding), and a step long enough to forget extrapolated the
  remaining clients' training and cost most of the model's utility.

Nothing here reads the retrain oracle or forget data: the defaults are what a
deployment runs (``stop="budget"``). Figures: the README and ``docs/results/``.

Only adapter tensors, metrics and configs cross the wire (the recovery round,
where there is one); the server step reads nothing but the history it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_unlearn.methods.foul.method import Foul, FoulConfig


@dataclass(kw_only=True)
class FoulServerConfig(FoulConfig):
    """:class:`~fed_unlearn.methods.foul.method.FoulConfig` with the on-server defaults.

    Parameters
    ----------
    mode : str
        Default ``"server"`` (every gradient from the history).
    server_direction : str
        Default ``"remove"`` (the departed clients' FedAvg share).
    server_step : str
        Default ``"share"`` (the step's length from the history; with
        ``"remove"`` the total step is ``server_lr`` times that share).
    server_lr : float
        Default 1.0 (the whole share; 0.5 on the ``tiny`` preset).
    subnetwork : str
        Default ``"all"``.
    recovery_rounds : int
        Default 0 (no client contacted; 1 on the ``tiny`` preset).
    local_steps : int
        Default 2 (local steps of each remaining client in a recovery round).
    recovery_budget : float
        Default 1/6 (those steps see a sixth of the examples retraining
        would show the client).
    wire_dtype : str
        Default ``"float16"``.
    """

    mode: str = "server"
    server_direction: str = "remove"
    server_step: str = "share"
    server_lr: float = 1.0
    subnetwork: str = "all"
    recovery_rounds: int = 0
    local_steps: int = 2
    recovery_budget: float = 1 / 6
    wire_dtype: str = "float16"


class FoulServer(Foul):
    """An on-server step from the FOUL history, then one short recovery round."""

    summary = (
        "FOUL's on-server setting: from the history alone, take back the "
        "departed clients' FedAvg share of the update, contacting no client; "
        "on the tiny preset half of it, then one fp16 recovery round of 2 steps "
        "sized to 1/6 of retraining's client compute [P/R]"
    )

    config: FoulServerConfig
