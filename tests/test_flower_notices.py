"""Flower's run_simulation deprecation notice is kept off the user's console; every
other Flower warning still reaches it."""

from __future__ import annotations

import logging

from simulations.runner import _quiet_run_simulation_notice


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_run_simulation_notice_is_dropped():
    _quiet_run_simulation_notice()
    _quiet_run_simulation_notice()  # once is enough: no second filter
    flwr_log = logging.getLogger("flwr")
    names = [type(f).__name__ for f in flwr_log.filters]
    assert names.count("_RunSimulationNotice") == 1
    keep = _Keep()
    flwr_log.addHandler(keep)
    try:
        flwr_log.warning(
            "DEPRECATED FEATURE: %s\n\n  This is a deprecated feature.",
            "The `run_simulation` function is deprecated and will be removed",
        )
        flwr_log.warning("fraction_evaluate is set to 0.0")
    finally:
        flwr_log.removeHandler(keep)
    assert keep.messages == ["fraction_evaluate is set to 0.0"]
