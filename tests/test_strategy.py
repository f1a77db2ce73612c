"""HistoryFedAvg's update validation on real Flower messages (no Ray)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fed_unlearn.history import HistoryStore
from server.strategy import HistoryFedAvg, sample_clients


@pytest.fixture
def strategy(tmp_path):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    s = HistoryFedAvg(
        run=ConfigRecord({"preset": "tiny"}),
        node_to_client={101: 0, 102: 1, 103: 2},
        exclude=(),
        history=HistoryStore(tmp_path / "h"),
        seed=0,
    )
    glob = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    msgs = list(s.configure_train(1, ArrayRecord(glob), ConfigRecord(), grid=None))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [101, 102, 103]
    return s, glob, {m.metadata.dst_node_id: m for m in msgs}


def _reply(incoming, state, n=10, cid=None):
    metrics = {
        "num-examples": n,
        "client-id": cid,
        "train-loss": 1.0,
        "local-steps": 1,
        "tokens": 8,
        "train-seconds": 0.1,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=incoming)


def test_good_updates_are_averaged_by_num_examples_and_recorded(strategy):
    s, glob, sent = strategy
    ups = {
        c: {k: torch.full_like(v, float(c + 1)) for k, v in glob.items()}
        for c in range(3)
    }
    replies = [
        _reply(sent[100 + c + 1], ups[c], n=(c + 1) * 10, cid=c) for c in range(3)
    ]
    arrays, _ = s.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    # (1*10 + 2*20 + 3*30) / 60 = 140/60
    assert torch.allclose(got["m.lora_A.weight"], torch.full((2, 3), 140 / 60))
    rec = s.history.load(1)
    assert rec.participants == [0, 1, 2] and rec.num_examples == {0: 10, 1: 20, 2: 30}
    assert torch.equal(rec.client_deltas[2]["m.lora_B.weight"], torch.full((4, 2), 3.0))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda st: {**st, "m.lora_A.weight": torch.full((2, 3), float("inf"))}, "Inf"),
        (lambda st: {**st, "m.lora_A.weight": torch.zeros(3, 3)}, "shape"),
        (lambda st: {**st, "x.lora_A.weight": torch.zeros(1)}, "unexpected"),
        (lambda st: {"m.lora_B.weight": st["m.lora_B.weight"]}, "missing"),
    ],
)
def test_bad_update_is_rejected_and_the_round_goes_on(strategy, corrupt, reason):
    s, glob, sent = strategy
    good = {k: torch.ones_like(v) for k, v in glob.items()}
    replies = [
        _reply(sent[101], good, cid=0),
        _reply(sent[102], corrupt(good), cid=1),
        _reply(sent[103], good, cid=2),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert torch.equal(
        arrays.to_torch_state_dict()["m.lora_A.weight"], torch.ones(2, 3)
    )
    rec = s.history.load(1)
    assert rec.participants == [0, 2]
    assert reason in rec.rejected[1]


def test_spoofed_client_id_and_bad_num_examples_are_rejected(strategy):
    s, glob, sent = strategy
    good = {k: torch.ones_like(v) for k, v in glob.items()}
    replies = [
        _reply(sent[101], good, cid=0),
        _reply(sent[102], good, cid=2),
        _reply(sent[103], good, n=0, cid=2),
    ]
    s.aggregate_train(1, replies)
    rec = s.history.load(1)
    assert rec.participants == [0]
    assert "client-id" in rec.rejected[1] and "num-examples" in rec.rejected[2]


def test_all_rejected_keeps_the_global_adapter(strategy):
    s, glob, sent = strategy
    bad = {k: torch.full_like(v, float("nan")) for k, v in glob.items()}
    arrays, metrics = s.aggregate_train(1, [_reply(sent[101], bad, cid=0)])
    assert arrays is None and metrics is None
    assert s.history.load(1).participants == []


def test_sampling_is_seeded_and_depends_on_round_and_seed():
    a = sample_clients(0, 3, 10, 0.5)
    assert a == sample_clients(0, 3, 10, 0.5) and len(a) == 5
    assert a == sorted(set(a)) and set(a) <= set(range(10))
    # 252 possible 5-of-10 samples: 20 rounds (or 20 seeds) drawing the same one
    # means the round (or the seed) is ignored
    by_round = {tuple(sample_clients(0, r, 10, 0.5)) for r in range(1, 21)}
    by_seed = {tuple(sample_clients(s, 3, 10, 0.5)) for s in range(20)}
    assert len(by_round) >= 10 and len(by_seed) >= 10
    assert sample_clients(0, 1, 4, 1.0) == [0, 1, 2, 3]
    # k = max(1, round(fraction * n)): 0.3 * 10 = 3; 0.01 * 10 rounds to 0 -> 1
    assert len(sample_clients(0, 1, 10, 0.3)) == 3
    assert len(sample_clients(0, 1, 10, 0.01)) == 1


def _sent_clients(tmp_path, exclude, server_round):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    nodes = {200 + c: c for c in range(10)}
    s = HistoryFedAvg(
        run=ConfigRecord({"preset": "tiny"}),
        node_to_client=nodes,
        exclude=exclude,
        history=HistoryStore(tmp_path / f"h{sorted(exclude)}"),
        seed=4,
        fraction=0.5,
    )
    glob = {"m.lora_A.weight": torch.zeros(2, 3)}
    msgs = s.configure_train(server_round, ArrayRecord(glob), ConfigRecord(), None)
    return {nodes[m.metadata.dst_node_id] for m in msgs}


def test_exclusion_happens_after_sampling(tmp_path):
    # the excluded clients are dropped from the round's sample, not replaced:
    # the others sampled stay the same and the round is smaller
    for server_round in (1, 2, 3):
        full = _sent_clients(tmp_path, (), server_round)
        assert len(full) == 5
        gone = sorted(full)[:2]
        kept = _sent_clients(tmp_path, gone, server_round)
        assert kept == full - set(gone) and len(kept) == 3
        # excluding a client the round did not sample changes nothing
        unsampled = min(set(range(10)) - full)
        assert _sent_clients(tmp_path, (unsampled,), server_round) == full


def test_an_update_far_longer_than_the_rounds_median_is_rejected(tmp_path):
    """Deltas of length 1, 2, 3 and 40 (median 2.5): 40 > 10 x 2.5, so client 3's
    update is rejected and never reaches the history; 3 < 25 is kept."""
    from helpers import train_reply

    from server.strategy import outlying_updates

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    s = HistoryFedAvg(
        run=ConfigRecord({"preset": "tiny"}),
        node_to_client={101: 0, 102: 1, 103: 2, 104: 3},
        exclude=(),
        history=HistoryStore(tmp_path / "h"),
        seed=0,
    )
    glob = {"m.lora_A.weight": torch.zeros(1, 1)}
    sent = {
        m.metadata.dst_node_id: m
        for m in s.configure_train(1, ArrayRecord(glob), ConfigRecord(), grid=None)
    }

    def reply(node, cid, length):
        state = {"m.lora_A.weight": torch.full((1, 1), float(length))}
        return train_reply(sent[node], cid, state)

    arrays, _ = s.aggregate_train(
        1, [reply(101, 0, 1), reply(102, 1, 2), reply(103, 2, 3), reply(104, 3, 40)]
    )
    rec = s.history.load(1)
    assert rec.participants == [0, 1, 2]
    assert "more than 10 x the round's median 2.5" in rec.rejected[3]
    # the new global adapter is FedAvg of the three kept: (1 + 2 + 3) / 3 = 2
    assert float(arrays.to_torch_state_dict()["m.lora_A.weight"]) == 2.0
    assert outlying_updates({0: glob, 1: glob}) == {}  # fewer than three: none


def _superlink_error_for(sent_msg):
    """The reply Flower's SuperLink makes for a message whose node went silent:
    from the SuperLink itself (node id 1), not from the node."""
    from flwr.app import Error, Metadata
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=sent_msg.metadata.message_id,
        group_id=sent_msg.metadata.group_id,
        created_at=0.0,
        ttl=60.0,
        message_type=sent_msg.metadata.message_type,
    )
    return Message(
        error=Error(ErrorCode.NODE_UNAVAILABLE, "Node Unavailable"), metadata=meta
    )


def test_a_lost_node_is_named_in_the_round_and_the_others_aggregate(strategy):
    from server.grid import attribute_replies, destinations

    s, glob, sent = strategy
    for node, m in sent.items():  # the ids the grid's push gives
        m.metadata.__dict__["_message_id"] = f"m{node}"
    good = {k: torch.ones_like(v) for k, v in glob.items()}
    replies = [_reply(sent[101], good, cid=0), _reply(sent[102], good, cid=1)]
    lost = _superlink_error_for(sent[103])
    fixed = attribute_replies([*replies, lost], destinations(sent.values()))
    assert fixed[2].metadata.src_node_id == 103 and fixed[:2] == replies
    s.aggregate_train(1, fixed)
    rec = s.history.load(1)
    assert rec.participants == [0, 1]
    assert "SuperLink answered for node 103" in rec.rejected[2]


def test_an_unattributable_reply_is_dropped_and_the_silent_client_named(strategy):
    """Before attribution a SuperLink reply has no client: it must neither crash
    the history (client id -1) nor go unmentioned."""
    s, glob, sent = strategy
    for node, m in sent.items():
        m.metadata.__dict__["_message_id"] = f"m{node}"
    good = {k: torch.ones_like(v) for k, v in glob.items()}
    replies = [_reply(sent[101], good, cid=0), _reply(sent[102], good, cid=1)]
    s.aggregate_train(1, [*replies, _superlink_error_for(sent[103])])
    rec = s.history.load(1)
    assert rec.participants == [0, 1]
    assert rec.rejected == {2: "no reply within the round's timeout"}
