"""FedRecovery against a hand-computed two-round history."""

from __future__ import annotations

import math

import pytest
import torch

from fed_unlearn.history import HistoryStore, RoundRecord
from fed_unlearn.methods import UnlearnContext, get_method

N = 4000  # entries per tensor: enough to measure the noise's spread


def _history(tmp_path, global_2=3.75, final=5.75):
    """Clients 0, 1, 2 with 10, 10, 20 examples; client 2 departs.

    round 1 from θ=0: deltas 1, 2, 6 -> FedAvg (10+20+120)/40 = 3.75
    round 2 from 3.75: deltas 1, 1, 3 -> FedAvg (10+10+60)/40 = 2 -> 5.75
    """
    full = lambda x: {"w": torch.full((N,), float(x))}  # noqa: E731
    store = HistoryStore(tmp_path / "h")
    n = {0: 10, 1: 10, 2: 20}
    for r, (g, d) in enumerate([(0.0, (1, 2, 6)), (global_2, (1, 1, 3))], start=1):
        store.append(
            RoundRecord(
                round=r,
                global_state=full(g),
                client_deltas={c: full(v) for c, v in enumerate(d)},
                num_examples=n,
                participants=[0, 1, 2],
            )
        )
    store.set_final(full(final))
    return store, full(final)


def _ctx(store, trained):
    return UnlearnContext(
        trained=trained, departed=(2,), remaining=(0, 1), seed=0, history=store
    )


def test_residuals_weighted_by_squared_update_norms(tmp_path):
    """Without the departed client the rounds' FedAvg are (10·1+10·2)/20 = 1.5 and
    1; the residuals 3.75 − 1.5 = 2.25 and 2 − 1 = 1; w_1 = 1, w_2 = ‖2‖²/‖3.75‖²
    = 4/14.0625. θ̃ = 5.75 − 2.25 − 4/14.0625."""
    store, trained = _history(tmp_path)
    res = get_method("fed_recovery").unlearn(_ctx(store, trained))
    want = 5.75 - 2.25 - 4 / 14.0625
    assert torch.allclose(res.adapter["w"], torch.full((N,), want), atol=1e-5)
    assert res.info["round_weights"] == pytest.approx([1.0, 4 / 14.0625])
    assert res.info["privacy"]["sigma"] == 0 and res.info["privacy"]["epsilon"] == "inf"
    assert res.rounds == 0  # no client contacted
    skip = get_method("fed_recovery", {"first_round_weight": 0}).unlearn(
        _ctx(store, trained)
    )
    assert torch.allclose(skip.adapter["w"], torch.full((N,), 5.75 - 4 / 14.0625))


def test_gaussian_noise_has_the_mechanisms_sigma(tmp_path):
    """σ = Δ·√(2 ln(1.25/δ))/ε with Δ = ‖correction‖ = √N·(2.25 + 4/14.0625)."""
    store, trained = _history(tmp_path)
    opts = {"epsilon": 4000.0, "delta": 1e-5, "seed": 3}
    res = get_method("fed_recovery", opts).unlearn(_ctx(store, trained))
    corr = 2.25 + 4 / 14.0625
    sens = math.sqrt(N) * corr
    sigma = sens * math.sqrt(2 * math.log(1.25e5)) / 4000.0
    assert res.info["privacy"]["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert res.info["privacy"]["sensitivity_l2"] == pytest.approx(sens, rel=1e-6)
    noise = res.adapter["w"] - (5.75 - corr)
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * sigma / math.sqrt(N))
    assert float(noise.std()) == pytest.approx(sigma, rel=0.05)
    again = get_method("fed_recovery", opts).unlearn(_ctx(store, trained))
    assert torch.equal(again.adapter["w"], res.adapter["w"])  # the seed fixes it


def test_a_history_that_is_not_fedavg_is_refused(tmp_path):
    # round 1 moved 5, its FedAvg 3.75: off by 1.25 of 5
    store, trained = _history(tmp_path, global_2=5.0)
    with pytest.raises(ValueError, match=r"assumes FedAvg.*25\.00%"):
        get_method("fed_recovery").unlearn(_ctx(store, trained))


@pytest.mark.parametrize(
    ("opt", "value"),
    [
        ("epsilon", 0.0),
        ("delta", 1.0),
        ("sensitivity", -1.0),
        ("first_round_weight", -1),
    ],
)
def test_option_errors_name_the_option(opt, value):
    with pytest.raises(ValueError, match=opt):
        get_method("fed_recovery", {opt: value})
