"""PGA: the ball projection, w_ref and the ascent rounds by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LinearClients

from fed_unlearn.history import HistoryStore, RoundRecord
from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.methods.pga import project_ball, reference_model
from fed_unlearn.protocol import LocalUpdateRequest, TokenAccuracyRequest

v = lambda a, b: {"w": torch.tensor([a, b], dtype=torch.float32)}  # noqa: E731


def test_projection_onto_the_ball_by_hand():
    """(3, 4) is 5 from 0: radius 2.5 halves it; inside the ball nothing moves;
    the distance is over the whole adapter, not per tensor."""
    out = project_ball(v(3, 4), v(0, 0), 2.5)
    assert torch.allclose(out["w"], torch.tensor([1.5, 2.0]))
    out = project_ball(v(4, 5), v(1, 1), 10.0)  # 5 from (1, 1)
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0]))
    two = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    zero = {"a": torch.zeros(1), "b": torch.zeros(1)}
    out = project_ball(two, zero, 1.0)
    # one vector of length 5 scaled to 1: (0.6, 0.8); per tensor would be (1, 1)
    assert torch.allclose(out["a"], torch.tensor([0.6]))
    assert torch.allclose(out["b"], torch.tensor([0.8]))


def _store(tmp_path):
    """One FL round from θ_T = (1, 1); clients 0, 1, 2 with 10, 30, 10 examples
    (p = 0.2, 0.6, 0.2) and deltas (2, 0), (0, 4), (4, 2); client 1 departs.
    w^T = (1, 1) + 0.2 (2, 0) + 0.6 (0, 4) + 0.2 (4, 2) = (2.2, 3.8)."""
    store = HistoryStore(tmp_path / "h")
    store.append(
        RoundRecord(
            round=1,
            global_state=v(1, 1),
            client_deltas={0: v(2, 0), 1: v(0, 4), 2: v(4, 2)},
            num_examples={0: 10, 1: 30, 2: 10},
            participants=[0, 1, 2],
        )
    )
    store.set_final(v(2.2, 3.8))
    return store


def test_reference_model_is_the_client_side_formula(tmp_path):
    """(w^T − p_u w_u)/(1 − p_u) with w_u = (1, 5): ((2.2 − 0.6)/0.4,
    (3.8 − 3)/0.4) = (4, 2), the mean of the others' models (3, 1) and (5, 3)."""
    w_ref, t = reference_model(_store(tmp_path), {1})
    assert t == 1
    assert torch.allclose(w_ref["w"], torch.tensor([4.0, 2.0]))


def _ctx(tmp_path):
    # client 1 pushes away from (4, 6): GA delta = -0.5 ((4, 6) - x)
    clients = LinearClients({0: v(0, 0), 1: v(4, 6), 2: v(8, 0)})
    ctx = UnlearnContext(
        trained=v(2.2, 3.8),
        departed=(1,),
        remaining=(0, 2),
        seed=0,
        history=_store(tmp_path),
        clients=clients,
        departed_cooperates=True,
    )
    return ctx, clients


def test_one_ascent_round_projection_and_post_training_by_hand(tmp_path):
    """From w_ref = (4, 2) the ascent step is -0.5 ((4, 6) - (4, 2)) = (0, -2):
    (4, 0), 2 from w_ref, projected onto radius 1: (4, 1). One post-training
    round of clients 0 and 2 (targets (0, 0), (8, 0), equal weights):
    (4, 1) + 0.5 ((4, 0) - (4, 1)) = (4, 0.5)."""
    ctx, clients = _ctx(tmp_path)
    res = get_method("pga", {"rounds": 1, "delta": 1.0}).unlearn(ctx)
    assert torch.allclose(res.adapter["w"], torch.tensor([4.0, 0.5]))
    assert res.rounds == 2 and res.info["ascent_rounds"] == 1
    (ascent,) = clients.requests[0].values()
    assert isinstance(ascent, LocalUpdateRequest) and ascent.loss == "ga"
    assert list(clients.requests[0]) == [1]  # only the departed client ascends
    assert torch.allclose(ascent.copies[0]["w"], torch.tensor([4.0, 2.0]))
    assert list(clients.requests[1]) == [0, 2]  # post-training: the others
    assert res.info["rounds"][0]["distance"] == pytest.approx(1.0)


def test_default_radius_is_a_third_of_the_distance_to_the_initial_adapter(tmp_path):
    """δ = ‖(4, 2) − (1, 1)‖/3 = √10/3; start="trained" projects w^T onto Ω:
    (2.2, 3.8) is ‖(−1.8, 1.8)‖ = 2.546 from w_ref, beyond √10/3 = 1.054."""
    ctx, clients = _ctx(tmp_path)
    opts = {"rounds": 1, "start": "trained", "recovery_rounds": 0}
    res = get_method("pga", opts).unlearn(ctx)
    delta = math.sqrt(10) / 3
    assert res.info["delta"] == pytest.approx(delta)
    sent = clients.requests[0][1].copies[0]["w"]
    want = torch.tensor([4.0, 2.0]) + torch.tensor([-1.8, 1.8]) * (
        delta / math.hypot(1.8, 1.8)
    )
    assert torch.allclose(sent, want, atol=1e-6)


def test_token_accuracy_below_tau_stops_the_ascent(tmp_path):
    """The linear client's accuracy is 1/(1 + ‖x − (4, 6)‖): 1/5 at w_ref, 1/6
    at (4, 1), where every later round lands again (radius 1). τ = 0.18 stops
    after round 1 of 3; τ = 0.1 runs all 3. Only the departed client is asked."""
    ctx, clients = _ctx(tmp_path)
    opts = {"rounds": 3, "delta": 1.0, "recovery_rounds": 0}
    res = get_method("pga", {**opts, "tau": 0.18}).unlearn(ctx)
    assert res.info["stopped_by"] == "tau" and res.info["ascent_rounds"] == 1
    assert res.info["token_accuracy"] == pytest.approx([1 / 5, 1 / 6])
    asked = [
        q
        for q in clients.requests
        if isinstance(next(iter(q.values())), TokenAccuracyRequest)
    ]
    assert len(asked) == 2 and all(list(q) == [1] for q in asked)
    ctx, _ = _ctx(tmp_path / "b")
    res = get_method("pga", {**opts, "tau": 0.1}).unlearn(ctx)
    assert res.info["stopped_by"] == "budget" and res.info["ascent_rounds"] == 3
    assert torch.allclose(res.adapter["w"], torch.tensor([4.0, 1.0]))


def test_no_accuracy_query_without_tau_and_bad_options_are_refused(tmp_path):
    ctx, clients = _ctx(tmp_path)
    get_method("pga", {"rounds": 2}).unlearn(ctx)
    assert not any(
        isinstance(r, TokenAccuracyRequest)
        for q in clients.requests
        for r in q.values()
    )
    for opt, bad in (
        ("tau", 1.5),
        ("delta", -1.0),
        ("delta_fraction", 0.0),
        ("start", "random"),
        ("rounds", 0),
        ("recovery_rounds", -1),
    ):
        with pytest.raises(ValueError, match=opt):
            get_method("pga", {opt: bad})


def test_token_accuracy_is_the_greedy_share_of_answer_tokens(tiny_model_dir, items):
    """Per item, argmax of the logits at each answer position (EOS excluded)
    against the answer token, averaged per item then over items."""
    from fed_unlearn.data.qa import encode_qa
    from fed_unlearn.metrics.quick import token_accuracy
    from fed_unlearn.models import LoraSpec, load_lora_model, prompt_formatter

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    fmt = prompt_formatter(tok)
    few = items[:4]
    per_item = []
    with torch.no_grad():
        for it in few:
            ids_list, labels_list = encode_qa(tok, fmt(it.question), it.answer, 64)
            ids = torch.tensor([ids_list])
            labels = torch.tensor(labels_list)
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
            pos = (labels[1:] != -100).nonzero().squeeze(-1)[:-1]  # no EOS
            per_item.append(float((pred[pos] == labels[1:][pos]).float().mean()))
    got = token_accuracy(model, tok, fmt, few, 64, batch_size=3)
    assert got == pytest.approx(sum(per_item) / len(per_item))
