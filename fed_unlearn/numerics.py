"""Numerics mode: bit-identical CPU results across thread counts and machines.

A seeded run is deterministic on one machine with one thread count: the same
command gives the same bytes. It is not across them. Two sources were found by
building the tiny base under each setting and comparing the weights' hashes
(``docs/development.md``, *Determinism*):

* **the thread count**: MKL's GEMM splits its work by thread, so 1 and 2
  threads sum in different orders;
* **the CPU's instruction set**: MKL and ATen's own vectorised kernels (norms,
  softmax, reductions) pick AVX-512 or AVX2 code paths by CPU, with different
  summation orders.

``FED_UNLEARN_NUMERICS=reproducible`` fixes both before torch loads:
``MKL_CBWR=AVX2,STRICT`` (MKL's conditional numerical reproducibility: the AVX2
code path on every CPU that has it, independent of the thread count) and
``ATEN_CPU_CAPABILITY=avx2`` (ATen's AVX2 kernels). A value the user already
set for either variable is kept. The mode costs some speed on AVX-512 machines
and is part of every cache key it touches (the tiny base, the FL phases), so a
reproducible run never reuses a phase computed natively. ``native`` (the
default) leaves the machine's fastest paths alone.

The variables are read when torch first runs a kernel, so the mode must be set
in the environment of the process before it imports torch; ``fed_unlearn``
applies it on import, and Ray's workers and Flower's ClientApp processes
inherit it. :func:`describe` is what ``run.json`` records.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

#: The environment variable that selects the mode.
MODE_ENV = "FED_UNLEARN_NUMERICS"
#: The modes.
MODES = ("native", "reproducible")
#: What the reproducible mode sets (unless the user set a value already).
REPRODUCIBLE_ENV = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}


class NumericsError(ValueError):
    """``FED_UNLEARN_NUMERICS`` holds a value that is not a mode."""


def mode() -> str:
    """Return the numerics mode of this process.

    Returns
    -------
    str
        ``"native"`` or ``"reproducible"``.

    Raises
    ------
    NumericsError
        If ``FED_UNLEARN_NUMERICS`` is set to anything else.
    """
    value = os.environ.get(MODE_ENV, "").strip().lower() or "native"
    if value not in MODES:
        raise NumericsError(
            f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not a numerics mode "
            f"(one of {', '.join(MODES)})"
        )
    return value


def apply() -> None:
    """Set the reproducible mode's variables, before torch loads.

    A no-op in the native mode. Warns when torch was imported before, because
    its kernels may then already have picked their code paths.
    """
    if mode() != "reproducible":
        return
    missing = {k: v for k, v in REPRODUCIBLE_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    if missing and "torch" in sys.modules:
        warnings.warn(
            f"{MODE_ENV}=reproducible was applied after torch was imported; set "
            f"{', '.join(f'{k}={v}' for k, v in missing.items())} in the "
            "environment before starting Python to be sure it takes effect",
            RuntimeWarning,
            stacklevel=2,
        )


def cache_tag() -> str:
    """Return what the mode adds to a cache key: nothing in the native mode.

    Returns
    -------
    str
        ``""`` (native: the keys of everything cached before the mode existed
        stay the same) or the mode and its variables' values.
    """
    if mode() == "native":
        return ""
    return "reproducible:" + ",".join(
        f"{k}={os.environ.get(k, '')}" for k in sorted(REPRODUCIBLE_ENV)
    )


def describe() -> dict[str, Any]:
    """Return what determines this process's floating-point results (for run.json).

    Returns
    -------
    dict
        The mode, torch's thread count and CPU capability, and the variables
        that steer MKL and ATen.
    """
    import torch

    return {
        "mode": mode(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": bool(torch.backends.mkl.is_available()),
        **{k: os.environ.get(k) for k in sorted(REPRODUCIBLE_ENV)},
    }
