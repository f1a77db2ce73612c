"""Pure-torch core of fed_unlearn: data, models, adapters, history, methods, metrics."""
