"""The FOUL family in one place: FOUL and its on-server default.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795); spec
``shared/specs/foul_mpu.md`` Part A. Provenance tags are in each module.

- :mod:`~fed_unlearn.methods.foul.method`: the ``foul`` method, its options and
  its three modes (``cached``, ``live``, ``server``), the forgettable
  sub-network θ_V and the departed clients' share of the history
  (:func:`~fed_unlearn.methods.foul.method.replayed_contribution`).
- :mod:`~fed_unlearn.methods.foul.server`: ``foul_server``, the product's
  default: the same algorithm with the defaults of its strict on-server recipe.
- :mod:`~fed_unlearn.methods.foul.geometry`: the server-side geometry, FOUL's
  conflict-averse (CAGrad-style) direction and the choice of θ_V.

FOUL-LoRA's training stage, the dual K/V adapters (:mod:`fed_unlearn.dual`),
runs during FL for every method and stays beside the FL code.
"""

from fed_unlearn.methods.foul.method import (
    Foul,
    FoulConfig,
    SubNetwork,
    rank_units,
    replayed_contribution,
)
from fed_unlearn.methods.foul.server import FoulServer, FoulServerConfig

__all__ = [
    "Foul",
    "FoulConfig",
    "FoulServer",
    "FoulServerConfig",
    "SubNetwork",
    "rank_units",
    "replayed_contribution",
]
