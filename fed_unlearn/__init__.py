"""Pure-torch core of fed_unlearn: data, models, adapters, history, methods, metrics."""

from fed_unlearn import numerics as _numerics

try:  # FED_UNLEARN_NUMERICS=reproducible, before anything here imports torch
    _numerics.apply()
except _numerics.NumericsError:  # a bad value: the CLI and the run report it
    pass
