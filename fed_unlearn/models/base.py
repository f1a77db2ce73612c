"""What every base-model module shares: the cache directory, the load error, seeding.

The cache lives in ``$FED_UNLEARN_CACHE`` (default ``~/.cache/fed_unlearn``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """Raised when a base model cannot be found or loaded."""


def cache_root() -> Path:
    """Return the cache directory (``$FED_UNLEARN_CACHE`` or ``~/.cache/fed_unlearn``).

    Returns
    -------
    Path
        The directory; created if missing.
    """
    root = Path(os.environ.get("FED_UNLEARN_CACHE", Path.home() / ".cache/fed_unlearn"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch.

    Parameters
    ----------
    seed : int
        The seed.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
