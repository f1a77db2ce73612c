"""Inner unlearning losses for LoRA-tuned causal LMs (pure torch, no Flower).

``L = γ·L_forget + α·L_retain`` as in open-unlearning @ d3d7cf9 [V]; the full list
with equations, sources and quirks is in :mod:`fed_unlearn.losses.objectives`,
the tensor forms (with golden tests) in :mod:`fed_unlearn.losses.functional`.

* :func:`unlearn_train` — run one loss on a peft model's trainable adapter.
* :data:`LOSSES`, :func:`get_loss`, :func:`list_losses` — the registry.
* :func:`frozen_reference` — the start-of-call adapter as reference model [R].
* :data:`IDK_ANSWERS` — refusals for IdkDPO / IdkNLL.
"""

from fed_unlearn.losses.functional import (
    answer_lengths,
    dpo_loss,
    ga_loss,
    masked_mse,
    mean_nll,
    npo_loss,
    rmu_control_vector,
    satimp_loss,
    sequence_nll,
    simnpo_loss,
    token_nll,
    uce_token_loss,
    undial_loss,
    undial_targets,
    wga_loss,
)
from fed_unlearn.losses.idk import IDK_ANSWERS, idk_items
from fed_unlearn.losses.objectives import LOSSES, LossSpec, get_loss, list_losses
from fed_unlearn.losses.reference import (
    FrozenReference,
    LayerTap,
    decoder_layers,
    frozen_reference,
)
from fed_unlearn.losses.train import unlearn_train

__all__ = [
    "IDK_ANSWERS",
    "LOSSES",
    "FrozenReference",
    "LayerTap",
    "LossSpec",
    "answer_lengths",
    "decoder_layers",
    "dpo_loss",
    "frozen_reference",
    "ga_loss",
    "get_loss",
    "idk_items",
    "list_losses",
    "masked_mse",
    "mean_nll",
    "npo_loss",
    "rmu_control_vector",
    "satimp_loss",
    "sequence_nll",
    "simnpo_loss",
    "token_nll",
    "uce_token_loss",
    "undial_loss",
    "undial_targets",
    "unlearn_train",
    "wga_loss",
]
