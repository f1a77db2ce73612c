"""FOUL on the server: a step from the history alone, then a short recovery.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795); spec
``shared/specs/foul_mpu.md`` Part A. The same algorithm and options as
:mod:`fed_unlearn.methods.foul.method`, with the defaults of its cheapest recipe:

1. ``mode="server"`` [P: "the server-side optimisation uses previously uploaded
   gradients", A.3 step 2; R: the rest]. No client is contacted while
   unlearning. The server takes every client's whole contribution from the FL
   history, g_u = -Σ_t (θ_t,u - θ_t), with FedAvg weights p_u = n_u / Σ n.
2. ``server_direction="remove"``, ``server_lr=0.75`` [R]: the step takes back
   three quarters of what the departed clients added to the global adapter
   under FedAvg, θ ← θ + 0.75 · Σ_f p_f g_f (derivation in
   :mod:`fed_unlearn.methods.foul.method`), in ``rounds`` equal steps (the
   curve's points). The factor is calibrated on the ``calibration`` suite
   (seeds 1000-1002; no evaluation suite uses them), per base model:

   * 0.75 for a pretrained base, on its ``smollm2-5c`` scenario
     (SmolLM2-135M-Instruct, seeds 1000-1001) over 0.5, 0.75 and 1: the
     smallest factor that closed the gap on both seeds at the retrain's
     utility; the whole share (1.0) cost utility on one of them. A ``custom``
     model gets this value too.
   * 0.5 on the ``tiny`` preset, whose base is trained from scratch on the
     synthetic facts (:data:`fed_unlearn.config.PRESET_METHOD_DEFAULTS`), on
     its ``tiny-*`` scenarios over 0.4-0.6 and 1-4: there the whole share
     overshot the oracle's forgetting, because the later rounds' updates of
     the other clients were computed on a model that held the departed
     contribution and carry part of it too, and the recovery round itself
     forgets more of the departed clients' facts.

   FOUL's conflict-averse direction (``server_direction="foul"``) stays
   available, but on whole-run contributions it is dominated by the retain
   mean g0: on the ``calibration`` suite its result did not change with κ
   (0.75, 2 and 5 gave the same adapter up to rounding), and a step long
   enough to forget extrapolated the remaining clients' training and cost
   most of the model's utility. Under a server-optimiser strategy
   (``strategy`` FedAdam, FedYogi, FedAdagrad, FedAvgM) the global step is not
   the average of the client deltas; there [R] the share is θ_T minus where
   that Flower strategy ends when replayed on the recorded rounds with the
   departed clients' terms taken out of each average
   (:func:`fed_unlearn.methods.foul.method.replayed_contribution`; under FedAvg it is
   the share above exactly). The factors were calibrated under FedAvg only.
3. ``subnetwork="all"``: θ_V is the whole adapter. Nothing travels during the
   server step, so FOUL's byte argument for a small θ_V does not apply.
4. ``recovery_rounds=1``, ``local_steps=2``, ``recovery_budget=1/6``,
   ``wire_dtype="float16"`` [R]: one FedAvg round of the remaining clients on
   their own data, adapters and deltas in fp16. The step of 2. removes the
   departed contribution to first order but cannot teach what retraining
   teaches the remaining clients' data; this round does. Each client takes two
   local steps that together see 1/6 of the examples retraining would show it
   (FL rounds x local epochs x its items), so the round costs each client a
   sixth of retraining's compute whatever the FL recipe.

Nothing here reads the retrain oracle or forget data: the defaults are what a
deployment runs (``stop="budget"``). Figures: the README and ``docs/results/``.

Only adapter tensors, metrics and configs cross the wire (the recovery round);
the server step reads nothing but the history it already holds.
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
        Default 0.75 (three quarters of the share; 0.5 on the ``tiny`` preset,
        :data:`fed_unlearn.config.PRESET_METHOD_DEFAULTS`; ``calibration``
        suite).
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
    server_direction: str = "remove"
    server_step: str = "share"
    server_lr: float = 0.75
    subnetwork: str = "all"
    recovery_rounds: int = 1
    local_steps: int = 2
    recovery_budget: float = 1 / 6
    wire_dtype: str = "float16"


class FoulServer(Foul):
    """An on-server step from the FOUL history, then one short recovery round."""

    summary = (
        "FOUL's on-server setting: from the history alone, take back three "
        "quarters of the departed clients' FedAvg share of the update (half on "
        "the tiny preset; no client contacted), then one fp16 recovery round of "
        "2 steps sized to 1/6 of retraining's client compute [P/R]"
    )
    config: FoulServerConfig
