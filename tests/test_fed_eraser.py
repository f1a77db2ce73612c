"""FedEraser and FedAccum against a hand-computed two-round history."""

from __future__ import annotations

import pytest
import torch
from helpers import LinearClients

from fed_unlearn.history import HistoryStore, RoundRecord
from fed_unlearn.methods import UnlearnContext, get_method


def _ctx(tmp_path):
    """Clients 0 (stays) and 1 (departs), 10 examples each.

    round 1 from θ = (0, 0): deltas c0 (3, 4), c1 (10, 10)
    round 2: deltas c0 (0, 1), c1 (2, 2)
    Client 0's linear map pulls any adapter x to (0, 8): delta 0.5 ((0, 8) - x).
    """
    v = lambda a, b: {"w": torch.tensor([a, b], dtype=torch.float32)}  # noqa: E731
    store = HistoryStore(tmp_path / "h")
    deltas = [{0: v(3, 4), 1: v(10, 10)}, {0: v(0, 1), 1: v(2, 2)}]
    glob = [v(0, 0), v(6.5, 7)]
    for r in (1, 2):
        store.append(
            RoundRecord(
                round=r,
                global_state=glob[r - 1],
                client_deltas=deltas[r - 1],
                num_examples={0: 10, 1: 10},
                participants=[0, 1],
            )
        )
    store.set_final(v(7.5, 8.5))
    clients = LinearClients({0: v(0, 8)})
    ctx = UnlearnContext(
        trained=v(7.5, 8.5),
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        clients=clients,
    )
    return ctx, clients


def test_calibration_keeps_the_old_length_and_takes_the_new_direction(tmp_path):
    """Round 1: old (3, 4) has length 5; from (0, 0) the fresh update is
    0.5 (0, 8) = (0, 4), so the step is 5 (0, 4)/4 = (0, 5). Round 2: old (0, 1)
    has length 1; from (0, 5) the fresh update is (0, 1.5): step (0, 1).
    Result (0, 6); the departed client is never asked."""
    ctx, clients = _ctx(tmp_path)
    res = get_method("fed_eraser", {"interval": 1}).unlearn(ctx)
    assert torch.allclose(res.adapter["w"], torch.tensor([0.0, 6.0]))
    assert res.rounds == 2
    assert all(set(q) == {0} for q in clients.requests)  # never client 1
    req = next(iter(clients.requests[0].values()))
    assert req.loss == "nll" and req.max_steps == 2
    assert req.budget == pytest.approx(0.5 / 2)  # r / T of retraining's examples


def test_interval_uses_every_dt_th_round_and_fedaccum_sums(tmp_path):
    ctx, clients = _ctx(tmp_path)
    res = get_method("fed_eraser", {"interval": 2}).unlearn(ctx)  # round 1 only
    assert torch.allclose(res.adapter["w"], torch.tensor([0.0, 5.0]))
    assert res.info["stored_rounds"] == [1]
    ctx, clients = _ctx(tmp_path / "b")
    accum = get_method("fed_eraser", {"interval": 1, "calibrate": False})
    res = accum.unlearn(ctx)
    # (3, 4) + (0, 1), no client contacted
    assert torch.allclose(res.adapter["w"], torch.tensor([3.0, 5.0]))
    assert clients.requests == [] and res.rounds == 0
    assert "live_clients" not in {r.value for r in accum.needs()}


def test_a_non_fedavg_run_and_bad_options_are_refused():
    from fed_unlearn.config import ConfigError, RunConfig

    for name in ("fed_eraser", "fed_recovery"):
        with pytest.raises((ConfigError, ValueError), match="assumes FedAvg"):
            RunConfig.from_flat(
                {"preset": "tiny", "method": name, "aggregation": "product_svd"}
            )
    for opt, bad in (("interval", 0), ("calibration_ratio", 0.0), ("eps", -1.0)):
        with pytest.raises(ValueError, match=opt):
            get_method("fed_eraser", {opt: bad})
