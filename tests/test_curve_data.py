"""Issue 17, finding 5: the server's per-round curve says what it measured.

When a SuperNode reads its own ``data-path``, the server's copy of the data set
is not what that client trains on; its hello says so (a flag, no path) and the
server measures no per-round curve.
"""

from __future__ import annotations

import pytest
import torch

from fed_unlearn.config import RunConfig
from server.pipeline import (
    CURVE_CLIENTS,
    CURVE_NONE,
    curve_data,
    curve_evaluator,
    discover_clients,
)


class _Nodes:
    """A grid whose nodes answer with the real ClientApp query handler."""

    def __init__(self, node_configs):
        self.node_configs = node_configs
        self.replies = []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict

        from clients.client_app import query

        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.node_configs[node],
                state=RecordDict(),
                run_config={},
            )
            out.append(query(msg, context))
        self.replies += out
        return out


def test_the_decision_on_hello_flags():
    assert curve_data({0: False, 1: False, 2: False}) == CURVE_CLIENTS
    assert curve_data({0: False, 1: True, 2: False}) == CURVE_NONE
    assert curve_data({0: True}) == CURVE_NONE
    with pytest.raises(ValueError, match="needs the hello replies"):
        curve_data({})


def test_a_node_with_its_own_data_path_says_so_and_the_curve_is_dropped(
    tmp_path, tiny_model_dir
):
    """Real hello handlers on three nodes, node 102 with its own JSONL file:
    the hellos carry the flag (the path never travels), discovery hands it to
    the decision, and the server then builds no curve evaluator; with every
    node on the run's data set it builds one, on the clients' items."""
    from flwr.app import ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fed_unlearn.data import generate_tofu, write_jsonl
    from fed_unlearn.models import init_adapter, load_lora_model

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    cfg = RunConfig(
        preset="tiny", model_path=str(tiny_model_dir), num_clients=3, depart="2"
    ).resolved()
    own = write_jsonl(tmp_path / "c1.jsonl", generate_tofu(9, 3, 1).clients[1])
    nodes = {
        101: {"partition-id": 0},
        102: {"partition-id": 1},
        103: {"partition-id": 2},
    }
    deployed = {**nodes, 102: {"partition-id": 1, "data-path": str(own)}}

    grid = _Nodes(deployed)
    mapping, local = discover_clients(grid, cfg, timeout=5)
    for rep in grid.replies:  # numbers only: the flag, never the path
        metrics = dict(rep.content["metrics"])
        assert set(metrics) == {
            "client-id",
            "num-examples",
            "local-data",
            "data-version",
        }
        assert all(type(v) is int for v in metrics.values()), metrics
    assert mapping == {101: 0, 102: 1, 103: 2}
    assert local[0] == local[2] == 0 and 2**56 <= local[1] < 2**57
    flags = {c: bool(v) for c, v in local.items()}
    assert curve_data(flags) == CURVE_NONE
    assert curve_evaluator(cfg, curve_data(flags)) is None

    mapping, local = discover_clients(_Nodes(nodes), cfg, timeout=5)
    assert local == {0: 0, 1: 0, 2: 0}
    evaluate = curve_evaluator(cfg, curve_data({c: bool(v) for c, v in local.items()}))
    assert evaluate is not None
    model, _ = load_lora_model(tiny_model_dir, cfg.lora_spec())
    rec = dict(evaluate(1, ArrayRecord(init_adapter(model, cfg.seed))))
    assert set(rec) == {"forget_Q_A_Prob", "retain_Q_A_Prob"}
    assert all(0.0 < float(v) < 1.0 for v in rec.values())
    assert torch.isfinite(torch.tensor([float(v) for v in rec.values()])).all()


def test_the_data_version_is_a_keyed_tag_of_the_node_file(tmp_path, monkeypatch):
    """Same file, same tag; one changed byte, another tag; a node with another
    secret gets another tag for the same bytes (so the server cannot test the
    tag against candidate data sets); the secret is the node's, mode 0600."""
    import hashlib
    import stat

    from clients.task import node_data_version

    data = tmp_path / "c.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    node = {"partition-id": 0, "data-path": str(data)}
    monkeypatch.setenv("FED_UNLEARN_CACHE", str(tmp_path / "node-a"))
    v1 = node_data_version(node)
    assert v1 == node_data_version(node) and 2**56 <= v1 < 2**57
    assert node_data_version({"partition-id": 0}) == 0
    # not the plain hash of the bytes
    plain = int.from_bytes(hashlib.sha256(data.read_bytes()).digest()[:7], "big")
    assert v1 != plain | (1 << 56)
    (secret,) = (tmp_path / "node-a" / "node-secrets").iterdir()
    assert (
        stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    )
    data.write_text('{"question": "q", "answer": "b"}\n')
    v2 = node_data_version(node)
    assert v2 != v1
    monkeypatch.setenv("FED_UNLEARN_CACHE", str(tmp_path / "node-b"))
    assert node_data_version(node) != v2


def test_a_phase_on_node_local_data_is_keyed_on_that_data(tmp_path, monkeypatch):
    """The run config does not determine an FL phase on node-local data: its
    cache entry is keyed on the nodes' data versions too, so a changed node
    file is never answered from the cache, and the run's data set keeps the
    config's key."""
    import types

    from server import pipeline
    from server.pipeline import node_data_tag, phase_dir

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path))
    cfg = RunConfig.from_flat({"preset": "tiny", "num-clients": 2, "depart": "1"})
    cfg = cfg.resolved()
    assert node_data_tag({0: 0, 1: 0}) == ""
    a = node_data_tag({0: 0, 1: (1 << 56) | 11})
    b = node_data_tag({0: 0, 1: (1 << 56) | 12})
    assert a and b and a != b and a == node_data_tag({1: (1 << 56) | 11, 0: 0})
    plain = phase_dir(cfg, ())
    assert plain.name == f"fl-{cfg.fl_key(())}"
    assert phase_dir(cfg, (), a) != plain and phase_dir(cfg, (), a) != phase_dir(
        cfg, (), b
    )
    asked = []

    def load(c, e, node_data=""):
        asked.append(node_data)
        return types.SimpleNamespace(path=phase_dir(c, e, node_data))

    monkeypatch.setattr(pipeline, "load_phase", load)
    pipeline.run_fl_phase(None, cfg, None, (), {})
    pipeline.run_fl_phase(None, cfg, None, (), {}, node_data=a)
    assert asked == ["", a]
