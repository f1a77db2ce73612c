"""ortho_lora: energy rank, basis, capacity, per-step projection, orthogonality."""

from __future__ import annotations

import pytest
import torch
from helpers import LinearClients, adapter_state, one_round_history

from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.ortho import (
    CapacityError,
    Projector,
    check_capacity,
    energy_rank,
    extend_basis,
    project_out,
)
from fed_unlearn.protocol import LocalUpdateRequest, ProtocolError


def test_energy_rank_on_a_hand_made_spectrum():
    # sigma = 3, 2, 1: energies 9, 4, 1 of 14 -> cumulative 9/14, 13/14, 1
    s = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(s, 0.6) == 1  # 9/14 = 0.643 >= 0.6
    assert energy_rank(s, 0.65) == 2  # 0.643 < 0.65 <= 0.929
    assert energy_rank(s, 0.92) == 2
    assert energy_rank(s, 0.93) == 3  # 13/14 = 0.9286 < 0.93
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.tensor([2.0, 0.0]), 1.0) == 1  # rank 1: one direction
    assert energy_rank(torch.zeros(3), 0.95) == 0
    with pytest.raises(ValueError, match="eps must be in"):
        energy_rank(s, 0.0)


def test_extend_basis_keeps_the_energy_directions_and_stays_orthonormal():
    # dW = diag(3, 2, 1) in the first three of 5 output dims: its left singular
    # vectors are e0, e1, e2; eps 0.9 keeps e0, e1 (13/14 of the energy)
    dw = torch.zeros(5, 4)
    dw[0, 0], dw[1, 1], dw[2, 2] = 3.0, 2.0, 1.0
    u, k = extend_basis(None, dw, 0.9)
    assert k == 2 and u.shape == (5, 2)
    proj = u @ u.T
    want = torch.zeros(5, 5)
    want[0, 0] = want[1, 1] = 1.0
    torch.testing.assert_close(proj, want, atol=1e-6, rtol=0)
    # an unconstrained second update overlapping e1: only its new part is added
    dw2 = torch.zeros(5, 4)
    dw2[1, 0], dw2[3, 1] = 1.0, 1.0
    u2, k2 = extend_basis(u, dw2, 1.0)
    assert k2 == 1 and u2.shape == (5, 3)
    torch.testing.assert_close(u2.T @ u2, torch.eye(3), atol=1e-6, rtol=0)
    assert abs(float(u2[3] @ u2[3]) - 1.0) < 1e-6  # e3 is in the span now


def test_capacity_exhaustion_is_a_clear_error_naming_the_layer():
    check_capacity(torch.zeros(3, 2), 3, "layers.0.q_proj")  # one direction left
    with pytest.raises(CapacityError, match=r"'layers.0.q_proj' is exhausted.*3 of"):
        check_capacity(torch.eye(3), 3, "layers.0.q_proj")


def test_projector_keeps_the_change_orthogonal_after_every_adam_step():
    g = torch.Generator().manual_seed(0)
    b = torch.nn.Parameter(torch.randn(6, 3, generator=g))
    b0 = b.detach().clone()
    u, _ = torch.linalg.qr(torch.randn(6, 2, generator=g))
    target = torch.randn(6, 3, generator=g)
    opt = torch.optim.AdamW([b], lr=0.1)
    project = Projector({"m.lora_B.weight": b}, {"m.lora_B.weight": u})
    for step in range(20):
        loss = ((b - target) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        project(step, float(loss.detach()))
        assert float((u.T @ (b.detach() - b0)).abs().max()) <= 1e-5
    # it moved, in the complement: the projected target direction is reached
    assert float((b.detach() - b0).norm()) > 0.5
    # without the projection Adam leaves the complement
    free = torch.nn.Parameter(b0.clone())
    opt = torch.optim.AdamW([free], lr=0.1)
    for _ in range(5):
        ((free - target) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert float((u.T @ (free.detach() - b0)).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="needs 6 rows"):
        Projector({"b": b}, {"b": torch.zeros(5, 1)})


def test_bases_travel_in_local_update_and_bad_ones_are_refused():
    copy = {"m.lora_B.weight": torch.zeros(3, 2)}
    u = torch.eye(3)[:, :1]
    req = LocalUpdateRequest(
        copies=[copy],
        base={"m.lora_A.weight": torch.ones(2, 4)},
        bases={"m.lora_B.weight": u},
    )
    fields, arrays = req.to_fields()
    assert set(arrays) == {
        "copy0.m.lora_B.weight",
        "base.m.lora_A.weight",
        "basis.m.lora_B.weight",
    }
    back = LocalUpdateRequest.from_fields(fields, arrays)
    assert torch.equal(back.bases["m.lora_B.weight"], u)
    assert set(back.base) == {"m.lora_A.weight"}
    with pytest.raises(ProtocolError, match="'basis.m.lora_A.weight' projects"):
        LocalUpdateRequest(copies=[copy], bases={"m.lora_A.weight": u})
    with pytest.raises(ProtocolError, match="needs 3 rows"):
        LocalUpdateRequest(copies=[copy], bases={"m.lora_B.weight": torch.eye(2)})


def _three_client_store(tmp_path, trained):
    deltas = {c: {k: 0.01 * v for k, v in trained.items()} for c in (0, 1, 2)}
    return one_round_history(tmp_path, trained, deltas)


def _products(state):
    return state["m.lora_B.weight"].double() @ state["m.lora_A.weight"].double()


def _request(store, cid, options, targets):
    ctx = UnlearnContext(
        trained=store.current(),
        departed=(cid,),
        remaining=(),
        seed=0,
        history=store,
        clients=LinearClients(targets),
        departed_cooperates=True,
    )
    res = get_method("ortho_lora", options).unlearn(ctx)
    store.record_unlearning([cid], res.adapter, {"method": "ortho_lora"})
    return res, ctx


def test_sequential_requests_have_orthogonal_updates_and_fill_the_capacity(
    tmp_path,
):
    """B is 3 x 2 (d_out = 3): request 1 takes 2 directions (eps = 1), request 2
    the last one, request 3 finds the layer full. The column spaces of the
    updates ΔW_t = B_t A - B_{t-1} A are orthogonal: ΔW_1ᵀ ΔW_2 = 0 and the
    singular vectors of ΔW_1 annihilate ΔW_2 (both computed here by SVD)."""
    trained = adapter_state(0)
    store = _three_client_store(tmp_path, trained)
    targets = {c: adapter_state(10 + c) for c in (0, 1, 2)}
    opts = {"eps": 1.0, "rounds": 2, "inner_loss": "ga", "retain": "none"}
    first, ctx1 = _request(store, 0, opts, targets)
    # request 1 sent only lora_B as the copy, the adapter's A as base, no basis
    req1 = ctx1.clients.requests[0][0]
    assert set(req1.copies[0]) == {"m.lora_B.weight"} and not req1.bases
    assert torch.equal(first.adapter["m.lora_A.weight"], trained["m.lora_A.weight"])
    second, ctx2 = _request(store, 1, opts, targets)
    req2 = ctx2.clients.requests[0][1]
    assert req2.bases["m.lora_B.weight"].shape == (3, 2)  # broadcast to the client
    dw1 = _products(first.adapter) - _products(trained)
    dw2 = _products(second.adapter) - _products(first.adapter)
    assert float(dw2.norm()) > 1e-3  # it did move
    u, s, _ = torch.linalg.svd(dw1)
    u1 = u[:, : int((s > 1e-6 * s[0]).sum())]
    assert u1.shape[1] == 2
    assert float((u1.T @ dw2).abs().max()) <= 1e-5
    assert float((dw1.T @ dw2).abs().max()) <= 1e-5
    assert second.info["requests"][0]["overlap"] <= 1e-5
    assert second.info["basis_dims"] == {"m": 3}
    with pytest.raises(CapacityError, match="layer 'm' is exhausted.*3 of its 3"):
        _request(store, 2, opts, targets)


def test_static_fusion_does_not_project_and_its_updates_collide(tmp_path):
    trained = adapter_state(0)
    store = _three_client_store(tmp_path, trained)
    targets = {c: adapter_state(10 + c) for c in (0, 1, 2)}
    opts = {"project": False, "rounds": 2, "inner_loss": "ga", "retain": "none"}
    first, _ = _request(store, 0, opts, targets)
    second, ctx2 = _request(store, 1, opts, targets)
    assert not ctx2.clients.requests[0][1].bases
    dw1 = _products(first.adapter) - _products(trained)
    dw2 = _products(second.adapter) - _products(first.adapter)
    assert float((dw1.T @ dw2).abs().max()) > 1e-3
    assert second.info["requests"][0]["overlap"] > 1e-3
    # a third request is not refused: static fusion has no capacity limit
    third, _ = _request(store, 2, opts, targets)
    assert third.info["requests"][0]["client"] == 2


def test_several_departed_clients_in_one_call_are_separate_requests(tmp_path):
    trained = adapter_state(0)
    store = _three_client_store(tmp_path, trained)
    targets = {c: adapter_state(10 + c) for c in (0, 1, 2)}
    ctx = UnlearnContext(
        trained=trained,
        departed=(2, 0),
        remaining=(1,),
        seed=0,
        history=store,
        clients=LinearClients(targets),
        departed_cooperates=True,
    )
    opts = {"eps": 1.0, "rounds": 1, "inner_loss": "ga", "retain": "none"}
    res = get_method("ortho_lora", opts).unlearn(ctx)
    calls = ctx.clients.calls
    assert [c for c, _ in calls] == [(2,), (0,)]  # in order, one at a time
    assert not ctx.clients.requests[0][2].bases
    assert ctx.clients.requests[1][0].bases["m.lora_B.weight"].shape[1] == 2
    assert [r["client"] for r in res.info["requests"]] == [2, 0]
    assert res.rounds == 2


def test_recovery_options_are_refused_where_they_would_break_the_method():
    with pytest.raises(ValueError, match="interleave_recovery would train inside"):
        get_method("ortho_lora", {"interleave_recovery": True})
    with pytest.raises(ValueError, match="recovery_rounds needs project=true"):
        get_method("ortho_lora", {"recovery_rounds": 1, "project": False})
    with pytest.raises(ValueError, match="recovery_rounds must be >= 0, got -1"):
        get_method("ortho_lora", {"recovery_rounds": -1})
    with pytest.raises(ValueError, match="eps must be in"):
        get_method("ortho_lora", {"eps": 1.5})


def test_project_out_by_hand():
    u = torch.tensor([[1.0], [0.0]])
    m = torch.tensor([[2.0, 3.0], [4.0, 5.0]])
    torch.testing.assert_close(project_out(m, u), torch.tensor([[0.0, 0.0], [4, 5.0]]))


def test_the_client_projects_its_unlearning_steps(monkeypatch, tiny_model_dir):
    """A real ``local-update`` on the tiny model with a basis per lora_B: the
    returned deltas lie in the complement (|Uᵀ ΔB| <= 1e-5), and the lora_A
    factors (base only) do not come back."""
    from flwr.app import Context, RecordDict

    import clients.unlearn as unlearn
    from fed_unlearn.config import RunConfig
    from fed_unlearn.models import (
        LoraSpec,
        get_adapter,
        init_adapter,
        load_lora_model,
        prompt_formatter,
    )

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=2, alpha=4))
    monkeypatch.setattr(
        unlearn, "client_model", lambda cfg: (model, tok, prompt_formatter(tok))
    )
    adapter = init_adapter(model, 0)
    g = torch.Generator().manual_seed(1)
    # a trained-looking adapter: B != 0, so the unlearning gradient reaches B
    adapter = {
        k: (v + 0.1 * torch.randn(v.shape, generator=g)) if "lora_B" in k else v
        for k, v in adapter.items()
    }
    b_keys = [k for k in adapter if "lora_B" in k]
    bases = {}
    for k in b_keys:
        u, _ = torch.linalg.qr(torch.randn(adapter[k].shape[0], 5, generator=g))
        bases[k] = u
    req = LocalUpdateRequest(
        copies=[{k: adapter[k] for k in b_keys}],
        base={k: v for k, v in adapter.items() if k not in b_keys},
        loss="ga",
        epochs=1,
        batch_size=4,
        lr=0.05,
        bases=bases,
    )
    cfg = RunConfig(preset="tiny", num_clients=3, people_per_client=1).resolved()
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    reply = unlearn.local_update(req, context, cfg)
    delta = reply.deltas[0]
    assert set(delta) == set(b_keys) and reply.local_steps >= 2
    moved = max(float(delta[k].norm()) for k in b_keys)
    assert moved > 1e-3
    for k in b_keys:
        assert float((bases[k].T @ delta[k]).abs().max()) <= 1e-5, k
    assert get_adapter(model).keys() == adapter.keys()


def test_projected_recovery_moves_only_lora_b_and_off_the_requests_subspace(tmp_path):
    trained = adapter_state(0)
    targets = {c: adapter_state(10 + c) for c in (0, 1, 2)}
    opts = {"eps": 1.0, "rounds": 1, "inner_loss": "ga", "retain": "none"}

    def serve(name, options):
        store = _three_client_store(tmp_path / name, trained)
        ctx = UnlearnContext(
            trained=store.current(),
            departed=(0,),
            remaining=(1, 2),
            seed=0,
            history=store,
            clients=LinearClients(targets),
            departed_cooperates=True,
        )
        return get_method("ortho_lora", options).unlearn(ctx), ctx

    plain, _ = serve("plain", opts)
    rec, ctx = serve("rec", {**opts, "recovery_rounds": 1})
    # after the request, one nll round of the remaining clients
    assert [c for c, _ in ctx.clients.calls] == [(0,), (1, 2)]
    assert ctx.clients.requests[1][1].loss == "nll"
    assert rec.rounds == 2 and plain.rounds == 1
    # lora_A stays frozen although the clients moved it; lora_B moved
    assert torch.equal(rec.adapter["m.lora_A.weight"], trained["m.lora_A.weight"])
    moved = (rec.adapter["m.lora_B.weight"] - plain.adapter["m.lora_B.weight"]).double()
    assert float(moved.abs().max()) > 1e-3
    # off the request's own subspace: the left singular vectors of its dW = dB A,
    # computed here by SVD (rank 2 of the 3 output dims)
    u, s, _ = torch.linalg.svd(_products(plain.adapter) - _products(trained))
    u1 = u[:, : int((s > 1e-6 * s[0]).sum())]
    assert u1.shape[1] == 2
    assert float((u1.T @ moved).abs().max()) <= 1e-5
    # a later request is orthogonal to the recorded change, recovery included
    store = ctx.history
    store.record_unlearning([0], rec.adapter, {"method": "ortho_lora"})
    second, _ = _request(store, 1, opts, targets)
    dw1 = _products(rec.adapter) - _products(trained)
    dw2 = _products(second.adapter) - _products(rec.adapter)
    assert float(dw2.abs().max()) > 1e-3
    assert float((dw1.T @ dw2).abs().max()) <= 1e-5
