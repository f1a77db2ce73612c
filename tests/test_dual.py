"""FOUL-LoRA's dual adapters: K/V split, regularisers, the server's prototype, θ_V."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import one_round_history

from fed_unlearn.config import ConfigError, RunConfig
from fed_unlearn.dual import (
    DualRegulariser,
    DualSpec,
    k_prototype,
    masked_token_mean,
    prototype_loss,
    v_units,
    variance_hinge,
)
from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.methods.base import MissingRequirementError


def test_variance_hinge_by_hand():
    # column 0: values 0, 2 -> unbiased var 2, std sqrt(2.0001) > 1 -> hinge 0
    # column 1: constant -> std sqrt(1e-4) = 0.01 -> hinge 0.99
    z = torch.tensor([[0.0, 3.0], [2.0, 3.0]])
    assert float(variance_hinge(z)) == pytest.approx(0.99 / 2, abs=1e-6)
    # column 0 values 0, 1: var 0.5, std sqrt(0.5001)
    z = torch.tensor([[0.0], [1.0]])
    assert float(variance_hinge(z)) == pytest.approx(1 - math.sqrt(0.5001), abs=1e-6)
    assert float(variance_hinge(torch.ones(1, 4))) == 0.0  # one example: no variance


def test_prototype_loss_and_token_mean_by_hand():
    p = torch.tensor([0.0, 1.0])
    assert float(prototype_loss(torch.tensor([1.0, 0.0]), p)) == pytest.approx(1.0)
    assert float(prototype_loss(torch.tensor([0.0, 3.0]), p)) == pytest.approx(0.0)
    assert float(prototype_loss(torch.tensor([1.0, 1.0]), p)) == pytest.approx(
        1 - 1 / math.sqrt(2)
    )
    x = torch.tensor([[[1.0], [3.0], [100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert masked_token_mean(x, mask).tolist() == [[2.0]]


def test_v_units_are_the_upper_ranks_and_a_wrong_rank_is_refused():
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    state = {a: torch.zeros(4, 3), b: torch.zeros(5, 4), "other": torch.zeros(2)}
    assert v_units(state, 2) == [f"{a}#2", f"{a}#3", f"{b}#2", f"{b}#3"]
    with pytest.raises(ValueError, match="rank 4; a dual adapter of split 3"):
        v_units(state, 3)


def test_dual_config_doubles_the_lora_and_keeps_old_cache_keys():
    base = RunConfig.from_flat({"preset": "tiny"})
    dual = RunConfig.from_flat({"preset": "tiny", "dual-adapter": "true"})
    assert (dual.lora_spec().r, dual.lora_spec().alpha) == (16, 32)
    assert (base.lora_spec().r, base.lora_spec().alpha) == (8, 16)
    assert dual.dual_spec() == DualSpec(split=8, k_weight=0.1, v_weight=0.1)
    assert base.dual_spec() is None
    # These literals pin the on-disk cache key (the fl-<key> directory of a
    # cached FL phase): computed once with the code that wrote the existing
    # caches. A change here makes every cached phase unreachable, so it must be
    # deliberate (bump FL_RECIPE_VERSION and update the literals).
    assert base.fl_key(()) == "c95a6efb5133c173"
    assert base.fl_key((2,)) == "998c22a314b45b14"
    # dual settings are no part of a single-adapter run's cache key ...
    tuned = RunConfig.from_flat({"preset": "tiny", "dual-k-weight": 0.5})
    assert tuned.fl_key(()) == "c95a6efb5133c173"
    # ... but they are of a dual run's
    dual_tuned = RunConfig.from_flat(
        {"preset": "tiny", "dual-adapter": True, "dual-k-weight": 0.5}
    )
    assert dual.fl_key(()) == "3b2acabda07e54c9"
    assert dual_tuned.fl_key(()) == "a59aabe07a5f8768"


def test_single_adapter_cache_keys_of_cached_phases_are_kept():
    """The standard suite's phases (seed 1, client 9 departing) are cached under
    these directories (~/.cache/fed_unlearn/runs/fl-<key>, checked when the
    literals were written): the keys pin the on-disk cache, and adding the dual
    settings to the config must not have moved them."""
    flat = {
        "preset": "tiny",
        "num-clients": 10,
        "people-per-client": 10,
        "qa-per-person": 10,
        "holdout-people": 10,
        "domains": 5,
        "num-server-rounds": 10,
        "local-epochs": 1,
        "general-probes": 120,
        "eval-max-items": 200,
        "seed": 1,
    }
    cfg = RunConfig.from_flat(flat)
    assert cfg.fl_key(()) == "13c05f82c1016787"
    assert cfg.fl_key((9,)) == "e296a4c4b30a6a3b"


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"dual-v-weight": -0.1}, "dual-v-weight must be >= 0"),
        ({"dual-layer": -2}, "dual-layer must be >= -1"),
        (
            {"dual-adapter": True, "aggregation": "product_svd"},
            "needs aggregation 'fedavg'",
        ),
        (
            {"method": "foul", "method-subnetwork": "dual"},
            "subnetwork=dual needs the FL run trained with dual-adapter=true",
        ),
    ],
)
def test_bad_dual_settings_are_clear_errors(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"preset": "tiny", **flat})


@pytest.fixture
def dual_model(tiny_model_dir):
    from fed_unlearn.models import LoraSpec, init_adapter, load_lora_model

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    state = init_adapter(model, seed=3)
    # non-zero B so that both halves change the output
    from fed_unlearn.models import get_adapter, set_adapter

    gen = torch.Generator().manual_seed(1)
    set_adapter(
        model,
        {
            k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v
            for k, v in state.items()
        },
    )
    return model, tok, get_adapter(model)


def _batch(tok):
    enc = tok(["Question: who? Answer: a b c", "Question: where?"], padding=True)
    return {
        "input_ids": torch.tensor(enc["input_ids"]),
        "attention_mask": torch.tensor(enc["attention_mask"]),
    }


def test_the_k_only_pass_equals_the_adapter_with_v_zeroed(dual_model):
    """Independent check of the masking hooks: zero V's rows of every lora_A
    by hand and compare the hidden states the regulariser's K-only pass sees."""
    from fed_unlearn.models import set_adapter

    model, tok, state = dual_model
    batch = _batch(tok)
    spec = DualSpec(split=2, k_weight=1.0, v_weight=0.0, layer=1)
    proto = torch.ones(32)
    with DualRegulariser(model, spec, prototype=proto) as reg:
        model(**batch)
        loss = reg(model, batch)
    proto_of_batch = k_prototype(model, spec, [batch])
    k_only = {k: v.clone() for k, v in state.items()}
    for k, v in k_only.items():
        if "lora_A" in k:
            v[2:] = 0.0
    set_adapter(model, k_only)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[2]
    m = batch["attention_mask"].float().unsqueeze(-1)
    h = (hidden * m).sum((0, 1)) / m.sum()
    want = 1 - torch.nn.functional.cosine_similarity(h, proto, dim=0)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)
    assert proto_of_batch == pytest.approx(h.tolist(), rel=1e-4, abs=1e-6)
    # and V does matter in the normal pass, so the mask is not a no-op
    set_adapter(model, state)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states[2]
    assert not torch.allclose(full, hidden, atol=1e-4)


def test_the_k_loss_never_reaches_v_and_the_v_loss_does(dual_model):
    """L_K runs with V masked, so V gets no gradient from it; L_V reads V's
    features, so V gets one (K may too: V's inputs depend on earlier modules)."""
    model, tok, _ = dual_model
    batch = _batch(tok)
    for k_w, v_w in ((1.0, 0.0), (0.0, 1.0)):
        model.zero_grad(set_to_none=True)
        spec = DualSpec(split=2, k_weight=k_w, v_weight=v_w, layer=0)
        with DualRegulariser(model, spec, prototype=torch.ones(32)) as reg:
            model(**batch)
            reg(model, batch).backward()
        k_half = v_half = 0.0
        for n, p in model.named_parameters():
            if p.grad is None or "lora_A" not in n:
                continue
            k_half += float(p.grad[:2].abs().sum())
            v_half += float(p.grad[2:].abs().sum())
        if k_w:
            assert k_half > 0 and v_half == 0.0
        else:
            assert v_half > 0
    model.zero_grad(set_to_none=True)


def test_regulariser_refuses_a_bad_layer_or_a_single_adapter(dual_model):
    model, _, _ = dual_model
    with pytest.raises(ValueError, match="dual-layer 5 is not a layer"):
        DualRegulariser(model, DualSpec(split=2, layer=5))
    with (
        pytest.raises(ValueError, match="needs rank 6"),
        DualRegulariser(model, DualSpec(split=3)),
    ):
        pass


def test_dual_training_adds_the_regularisers_and_reports_the_nll(dual_model, items):
    """Same seed, same data: with λ = 0 the dual loop is plain training (the hooks
    change nothing), with λ > 0 the adapter ends elsewhere; the reported loss is
    the NLL in both."""
    from fed_unlearn.models import get_adapter, prompt_formatter, set_adapter
    from fed_unlearn.training import TrainSpec, local_train

    model, tok, state = dual_model
    spec = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=48)
    ends = []
    for k_w, v_w in ((None, None), (0.0, 0.0), (1.0, 1.0)):
        set_adapter(model, state)
        if k_w is None:
            stats = local_train(model, tok, prompt_formatter(tok), items, spec, 5)
        else:
            d = DualSpec(split=2, k_weight=k_w, v_weight=v_w)
            with DualRegulariser(model, d, prototype=torch.ones(32)) as reg:
                stats = local_train(
                    model, tok, prompt_formatter(tok), items, spec, 5, regulariser=reg
                )
            means = reg.mean_losses()
            if k_w:  # 1 - cos is in [0, 2]; the hinge in [0, 1]
                assert 0 < means["loss_k"] <= 2 and 0 < means["loss_v"] <= 1
            else:  # both terms off: nothing computed, nothing reported
                assert means == {"loss_k": 0.0, "loss_v": 0.0}
        ends.append((get_adapter(model), stats.loss))
    for k in state:
        assert torch.allclose(ends[0][0][k], ends[1][0][k], atol=1e-6), k
    assert ends[0][1] == pytest.approx(ends[1][1], rel=1e-5)
    assert any(not torch.allclose(ends[0][0][k], ends[2][0][k]) for k in state)


def test_strategy_broadcasts_the_servers_prototype_and_refuses_a_clients(tmp_path):
    """Every train request, round 1 included, carries prototype_fn of the adapter
    it sends; a reply that carries a prototype of its own is rejected."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    from helpers import train_reply

    from fed_unlearn.history import HistoryStore
    from server.strategy import HistoryFedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    run = ConfigRecord({"preset": "tiny", "dual-adapter": True})
    nodes = {101: 0, 102: 1, 103: 2}
    with pytest.raises(ValueError, match="needs the server's prototype_fn"):
        HistoryFedAvg(run=run, node_to_client=nodes, exclude=(), history=None, seed=0)
    with pytest.raises(ValueError, match="for dual-adapter runs only"):
        HistoryFedAvg(
            run=ConfigRecord({"preset": "tiny"}),
            node_to_client=nodes,
            exclude=(),
            history=None,
            seed=0,
            prototype_fn=lambda st: [0.0],
        )
    s = HistoryFedAvg(
        run=run,
        node_to_client=nodes,
        exclude=(),
        history=HistoryStore(tmp_path / "h"),
        seed=0,
        prototype_fn=lambda st: [float(st["m.lora_A.weight"].sum()), -1.0],
    )
    glob = {"m.lora_A.weight": torch.full((2, 3), 0.5)}
    sent = {
        m.metadata.dst_node_id: m
        for m in s.configure_train(1, ArrayRecord(glob), ConfigRecord(), grid=None)
    }
    for m in sent.values():  # 6 entries of 0.5
        assert list(m.content["config"]["dual-prototype"]) == [3.0, -1.0]
    s.aggregate_train(
        1,
        [
            train_reply(sent[101], 0, glob, 10),
            train_reply(sent[102], 1, glob, 10, proto=[1.0, 0.0]),
            train_reply(sent[103], 2, glob, 10),
        ],
    )
    rec = s.history.load(1)
    assert rec.participants == [0, 2]
    assert "unknown key 'dual-prototype'" in rec.rejected[1]
    glob2 = {"m.lora_A.weight": torch.ones(2, 3)}
    nxt = list(s.configure_train(2, ArrayRecord(glob2), ConfigRecord(), grid=None))
    assert list(nxt[0].content["config"]["dual-prototype"]) == [6.0, -1.0]


def test_foul_dual_steps_only_the_client_specific_half(tmp_path):
    """θ_V = V's rows of A and columns of B: with κ = 0 and one budget step of
    η = 1 the retain mean (0.1) is added there, and K stays as trained."""
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    trained = {a: torch.ones(4, 3), b: torch.ones(3, 4)}
    retain = {a: torch.full((4, 3), 0.1), b: torch.full((3, 4), 0.1)}
    forget = {a: torch.full((4, 3), 0.3), b: torch.full((3, 4), 0.3)}
    store = one_round_history(tmp_path, trained, {0: retain, 1: forget})
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        dual_split=2,
    )
    opts = {"mode": "server", "subnetwork": "dual", "kappa": 0.0, "rounds": 1}
    res = get_method("foul", {**opts, "stop": "budget"}).unlearn(ctx)
    want_a = torch.ones(4, 3)
    want_a[2:] += 0.1
    want_b = torch.ones(3, 4)
    want_b[:, 2:] += 0.1
    assert torch.allclose(res.adapter[a], want_a)
    assert torch.allclose(res.adapter[b], want_b)
    assert res.info["subnetwork"]["params"] == 12
    single = UnlearnContext(
        trained=trained, departed=(1,), remaining=(0,), seed=0, history=store
    )
    with pytest.raises(MissingRequirementError, match="dual-adapter=true"):
        get_method("foul", opts).unlearn(single)


def test_the_broadcast_prototype_is_the_same_whatever_records_clients_hold(
    tmp_path, tiny_model_dir
):
    """Issue 17's decomposition, finding 2: two federations that differ only in
    client 1's records. The K-only mean of client 1's records (what clients used
    to send) tells them apart; the prototype the server broadcasts is the same,
    bit for bit, and is a function of the global adapter alone; client 1's
    real train reply carries its adapter and scalars, no vector of its data."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import train
    from fed_unlearn.data import collate, generate_tofu, write_jsonl
    from fed_unlearn.history import HistoryStore
    from fed_unlearn.models import (
        init_adapter,
        load_lora_model,
        prompt_formatter,
        set_adapter,
    )
    from fed_unlearn.training import encode_items
    from server.channel import run_record
    from server.pipeline import prototype_maker
    from server.strategy import HistoryFedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    cfg = RunConfig(
        preset="tiny",
        model_path=str(tiny_model_dir),
        num_clients=3,
        dual_adapter=True,
        local_epochs=1,
    ).resolved()
    spec = cfg.dual_spec()
    model, tok = load_lora_model(tiny_model_dir, cfg.lora_spec())
    initial = init_adapter(model, cfg.seed)
    mine = generate_tofu(0, 3, people_per_client=1).clients[1]
    held = {"A": mine, "B": mine[:5] + generate_tofu(7, 3, 1).clients[1][:5]}
    pad = int(tok.pad_token_id)
    fmt = prompt_formatter(tok)
    broadcast, client_mean, globals_after, makers = {}, {}, {}, {}
    for fed, records in held.items():
        path = write_jsonl(tmp_path / f"{fed}.jsonl", records)
        makers[fed] = prototype_maker(cfg)
        s = HistoryFedAvg(
            run=run_record(cfg),
            node_to_client={101: 0, 102: 1, 103: 2},
            exclude=(),
            history=HistoryStore(tmp_path / f"h{fed}"),
            seed=cfg.seed,
            prototype_fn=makers[fed],
        )
        msgs = list(s.configure_train(1, ArrayRecord(initial), ConfigRecord(), None))
        to_1 = next(m for m in msgs if m.metadata.dst_node_id == 102)
        broadcast[fed] = list(to_1.content["config"]["dual-prototype"])
        node = {"partition-id": 1, "data-path": str(path)}
        context = Context(
            run_id=1, node_id=102, node_config=node, state=RecordDict(), run_config={}
        )
        reply = train(to_1, context)
        metrics = dict(reply.content["metrics"])
        assert set(metrics) == {
            "num-examples", "client-id", "train-loss", "local-steps", "tokens",
            "train-seconds", "dual-loss-k", "dual-loss-v",
        }  # fmt: skip
        assert all(type(v) in (int, float) for v in metrics.values()), metrics
        assert metrics["dual-loss-k"] > 0  # the broadcast target was used
        s.aggregate_train(1, [reply])
        assert s.history.load(1).participants == [1]
        globals_after[fed] = s.history.load(1).client_deltas[1]
        enc = encode_items(tok, fmt, records, int(cfg.max_length))
        set_adapter(model, initial)
        client_mean[fed] = k_prototype(model, spec, [collate(enc, pad)])
    assert broadcast["A"] == broadcast["B"]
    gap = max(
        abs(a - b) for a, b in zip(client_mean["A"], client_mean["B"], strict=True)
    )
    assert gap > 1e-3  # the old client statistic would have told A from B
    # after round 1 the global adapters differ (by the updates, on the wire
    # anyway); the prototype follows the adapter and nothing else
    delta = globals_after["A"]
    state = {k: initial[k] + delta[k] for k in initial}
    assert makers["A"](state) == makers["B"](state)
