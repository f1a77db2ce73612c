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
        assert set(metrics) == {"client-id", "num-examples", "local-data"}
        assert all(type(v) is int for v in metrics.values()), metrics
    assert mapping == {101: 0, 102: 1, 103: 2}
    assert local == {0: False, 1: True, 2: False}
    assert curve_data(local) == CURVE_NONE
    assert curve_evaluator(cfg, curve_data(local)) is None

    mapping, local = discover_clients(_Nodes(nodes), cfg, timeout=5)
    assert local == {0: False, 1: False, 2: False}
    evaluate = curve_evaluator(cfg, curve_data(local))
    assert evaluate is not None
    model, _ = load_lora_model(tiny_model_dir, cfg.lora_spec())
    rec = dict(evaluate(1, ArrayRecord(init_adapter(model, cfg.seed))))
    assert set(rec) == {"forget_Q_A_Prob", "retain_Q_A_Prob"}
    assert all(0.0 < float(v) < 1.0 for v in rec.values())
    assert torch.isfinite(torch.tensor([float(v) for v in rec.values()])).all()
