"""Flower's strategies with a history: the wrapper steps as Flower does, the
replay's server steps match hand-computed ones, FedProx's term, and the
methods that assume FedAvg refuse a server optimiser."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fed_unlearn.config import STRATEGIES, ConfigError, RunConfig
from fed_unlearn.history import HistoryStore, RoundRecord
from fed_unlearn.methods import get_method
from fed_unlearn.methods.foul import replayed_contribution
from fed_unlearn.protocol import TrainRequest
from fed_unlearn.training import ProximalTerm
from server.strategy import (
    FLOWER_STRATEGIES,
    history_strategy,
    replay_server_steps,
    strategy_options,
)
from tests.helpers import train_reply

NODES = {101: 0, 102: 1, 103: 2}


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower messages are made inside a run: give them one (as test_strategy)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _cfg(strategy, **kw):
    return RunConfig(preset="tiny", strategy=strategy, **kw).validated().resolved()


class _Grid:
    """What Flower's own configure_train asks of a grid: the node ids."""

    def get_node_ids(self):
        return list(NODES)


def _replies(msgs, glob):
    """Fixed client updates: client c moves every entry by (c + 1) / 10 and -c/20."""
    out = []
    for m in msgs:
        cid = NODES[m.metadata.dst_node_id]
        adapter = {
            "m.lora_A.weight": glob["m.lora_A.weight"] + (cid + 1) / 10,
            "m.lora_B.weight": glob["m.lora_B.weight"] - cid / 20,
        }
        out.append(train_reply(m, cid, adapter, n=10 * (cid + 1)))
    return out


@pytest.mark.parametrize("name", STRATEGIES)
def test_one_round_through_the_wrapper_is_flowers_own_step(name, tmp_path):
    cfg = _cfg(name)
    ours = history_strategy(
        cfg,
        run=ConfigRecord({"preset": "tiny"}),
        node_to_client=NODES,
        exclude=(),
        history=HistoryStore(tmp_path / "h"),
    )
    flower = FLOWER_STRATEGIES[name](**strategy_options(cfg))
    glob = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    got, want = [], []
    for rnd in (1, 2):  # two rounds: the optimisers' moments carry over
        arrays = ArrayRecord(glob)
        msgs = list(ours.configure_train(rnd, arrays, ConfigRecord(), grid=None))
        theirs = list(flower.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
        assert len(msgs) == len(theirs) == 3
        new_ours, _ = ours.aggregate_train(rnd, _replies(msgs, glob))
        new_theirs, _ = flower.aggregate_train(rnd, _replies(msgs, glob))
        got.append(new_ours.to_torch_state_dict())
        want.append(new_theirs.to_torch_state_dict())
        glob = {k: v.float() for k, v in got[-1].items()}
    for g, w in zip(got, want, strict=True):
        for k in w:
            torch.testing.assert_close(g[k].float(), w[k].float(), rtol=0, atol=0)
    # and it was recorded: two rounds, each client's delta
    assert ours.history.rounds() == [1, 2]
    rec = ours.history.load(1)
    torch.testing.assert_close(
        rec.client_deltas[2]["m.lora_A.weight"], torch.full((2, 3), 0.3)
    )


def test_fedprox_sends_mu_and_fedavg_sends_none(tmp_path):
    for name, mu in (("fedprox", 0.25), ("fedavg", 0.0)):
        cfg = _cfg(name, **({"proximal_mu": mu} if name == "fedprox" else {}))
        s = history_strategy(
            cfg,
            run=ConfigRecord({"preset": "tiny"}),
            node_to_client=NODES,
            exclude=(),
            history=HistoryStore(tmp_path / name),
        )
        glob = {"m.lora_A.weight": torch.ones(2, 3)}
        msg = next(iter(s.configure_train(1, ArrayRecord(glob), ConfigRecord(), None)))
        req = TrainRequest.from_fields(
            dict(msg.content["config"]), msg.content["arrays"].to_torch_state_dict()
        )
        assert req.proximal_mu == mu


def test_replay_steps_by_hand():
    start = {"a": torch.ones(1)}
    steps = [{"a": torch.full((1,), 0.1)}, {"a": torch.full((1,), -0.05)}]
    # FedAvg and FedProx: start + the steps
    for name in ("fedavg", "fedprox"):
        out = replay_server_steps(_cfg(name), start, steps)
        assert float(out["a"]) == pytest.approx(1.05, abs=1e-7)
    # FedAvgM, lr 1, momentum 0.9: v1 = -0.1 -> 1.1; v2 = 0.9(-0.1) + 0.05 -> 1.14
    out = replay_server_steps(_cfg("fedavgm"), start, steps)
    assert float(out["a"]) == pytest.approx(1.14, abs=1e-6)
    # FedAdam, eta 0.01, b1 0.9, b2 0.99, tau 1e-3 (Reddi et al. with Flower's
    # bias correction eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)))
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    theta, m, v = 1.0, 0.0, 0.0
    for t, d in ((1, 0.1), (2, -0.05)):
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        theta += (
            eta
            * math.sqrt(1 - b2 ** (t + 1))
            / (1 - b1 ** (t + 1))
            * m
            / (math.sqrt(v) + tau)
        )
    out = replay_server_steps(_cfg("fedadam"), start, steps)
    assert float(out["a"]) == pytest.approx(theta, abs=1e-6)
    assert theta == pytest.approx(1.00885, abs=1e-5)  # the hand value


def _history(tmp_path, deltas, sizes, final):
    """Two rounds, each client's delta as given, global 0 then its FedAvg."""
    store = HistoryStore(tmp_path / "h")
    glob = {"x": torch.zeros(3)}
    for r, (d, n) in enumerate(zip(deltas, sizes, strict=True), 1):
        store.append(
            RoundRecord(
                round=r,
                global_state=glob,
                client_deltas={c: {"x": v} for c, v in d.items()},
                num_examples=n,
                participants=sorted(d),
            )
        )
        total = sum(n.values())
        glob = {"x": glob["x"] + sum(n[c] / total * v for c, v in d.items())}
    store.set_final(final if final is not None else glob)
    return store


def test_replayed_contribution_under_fedavg_is_the_departed_share(tmp_path):
    deltas = [
        {0: torch.tensor([1.0, 0, 0]), 1: torch.tensor([0, 2.0, 0])},
        {0: torch.tensor([0, 0, 3.0]), 1: torch.tensor([1.0, 1.0, 1.0])},
    ]
    sizes = [{0: 1, 1: 3}, {0: 1, 1: 3}]
    store = _history(tmp_path, deltas, sizes, None)
    cfg = _cfg("fedavg")
    c = replayed_contribution(
        store, (1,), lambda s, st: replay_server_steps(cfg, s, st)
    )
    # client 1's share: 3/4 * ([0,2,0] + [1,1,1]) = [0.75, 2.25, 0.75]
    torch.testing.assert_close(c["x"], torch.tensor([0.75, 2.25, 0.75]))


def test_proximal_term_value_and_gradient_by_hand():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
    term = ProximalTerm(lin, mu=0.5)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0]]))  # moved by (1, 2)
    value = term(lin, {})
    assert float(value.detach()) == pytest.approx(0.5 / 2 * (1 + 4))
    value.backward()
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="proximal mu"):
        ProximalTerm(lin, mu=-1.0)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"strategy": "fedsgd"}, "'strategy'"),
        ({"strategy": "fedavg", "server_eta": 0.5}, "'server-eta' is read only by"),
        ({"strategy": "fedprox", "server_momentum": 0.5}, "'server-momentum'"),
        ({"strategy": "fedadam", "server_beta_1": 1.0}, "'server-beta-1' is out of"),
        ({"strategy": "fedprox", "proximal_mu": -0.1}, "'proximal-mu' is out of"),
        ({"strategy": "fedadam", "aggregation": "product_svd"}, "needs aggregation"),
        (
            {"strategy": "fedadam", "server_tau": math.inf},
            "'server-tau' must be finite",
        ),
    ],
)
def test_bad_strategy_settings_are_named(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(preset="tiny", **kw).validated()


def test_fedavg_methods_refuse_a_server_optimiser_but_not_fedprox():
    for name in ("fed_eraser", "fed_recovery"):
        m = get_method(name)
        for strategy in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
            with pytest.raises(ValueError, match="server optimiser"):
                m.check_run({"strategy": strategy})
        m.check_run({"strategy": "fedprox"})
        m.check_run({"strategy": "fedavg"})


def test_strategy_keys_stay_out_of_the_fl_key_unless_read():
    base = _cfg("fedavg").fl_key(())
    assert _cfg("fedprox").fl_key(()) != base
    assert _cfg("fedprox", proximal_mu=0.1).fl_key(()) != _cfg("fedprox").fl_key(())
    assert _cfg("fedadam").fl_key(()) != _cfg("fedyogi").fl_key(())
    assert _cfg("fedadam", server_eta=0.02).fl_key(()) != _cfg("fedadam").fl_key(())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedadam", "fedprox"])
def test_whole_pipeline_under_a_strategy(name, tmp_path):
    """FL, a departure, foul_server and the retrain oracle, all under ``name``."""
    import json

    from safetensors.torch import load_file

    from fed_unlearn.history import HistoryStore
    from tests.helpers import E2E_BASE, run_cli

    out = tmp_path / "run"
    args = ["run", *E2E_BASE, "--method", "foul_server", "--set", f"strategy={name}"]
    run_cli([*args, "--out", str(out)], tmp_path / "runs")
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["strategy"] == name
    for model in ("original", "unlearned", "retrain"):
        assert run["summary"][model]["forget_Q_A_Prob"] is not None
    adapters = {
        m: load_file(out / "adapters" / m / "adapter_model.safetensors")
        for m in ("original", "unlearned", "retrain")
    }
    assert any(
        not torch.equal(adapters["original"][k], adapters["unlearned"][k])
        for k in adapters["original"]
    )
    if name == "fedadam":
        # the replay of the recorded rounds ends where FL ended
        store = HistoryStore(run["history"]["path"])
        cfg = RunConfig.from_flat(run["config"]).validated().resolved()
        rounds = [store.load(r) for r in store.rounds()]
        steps = []
        for rec in rounds:
            n = sum(rec.num_examples[c] for c in rec.participants)
            steps.append(
                {
                    k: sum(
                        rec.num_examples[c] / n * rec.client_deltas[c][k].float()
                        for c in rec.participants
                    )
                    for k in rounds[0].global_state
                }
            )
        end = replay_server_steps(cfg, rounds[0].global_state, steps)
        final = store.final()
        for k in final:
            torch.testing.assert_close(end[k], final[k].float(), rtol=1e-4, atol=1e-6)
    # a FedAvg-assuming method is refused under a server optimiser, before any work
    proc = run_cli(
        [
            "run",
            *E2E_BASE,
            "--method",
            "fed_eraser",
            "--set",
            f"strategy={name}",
            "--out",
            str(tmp_path / "eraser"),
        ],
        tmp_path / "runs",
        check=False,
    )
    if name == "fedadam":
        assert proc.returncode != 0 and "server optimiser" in proc.stderr
        assert not (tmp_path / "eraser").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
