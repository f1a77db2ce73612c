"""The typed protocol: every kind round-trips, what does not fit is refused."""

from __future__ import annotations

import pytest
import torch

from fed_unlearn.config import ConfigError, RunConfig
from fed_unlearn.protocol import (
    REPLIES,
    REQUESTS,
    AttributionReply,
    AttributionRequest,
    AuditReply,
    AuditRequest,
    EvaluateReply,
    EvaluateRequest,
    HelloReply,
    HelloRequest,
    LayerGramReply,
    LayerGramRequest,
    LocalUpdateReply,
    LocalUpdateRequest,
    ProtocolError,
    TokenAccuracyReply,
    TokenAccuracyRequest,
    TrainReply,
    TrainRequest,
    decode_reply,
    decode_request,
    decode_run,
    encode_run,
    pack_copies,
    unpack_copies,
)

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _adapter(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(scale * 10))
    return {A: scale * torch.randn(2, 3, generator=g), B: torch.randn(3, 2)}


def _requests():
    return [
        HelloRequest(),
        TrainRequest(_adapter(), server_round=3),
        TrainRequest(_adapter(), server_round=2, dual_prototype=[0.5, -1.0]),
        EvaluateRequest(_adapter()),
        AuditRequest(_adapter()),
        LocalUpdateRequest(copies=[_adapter()]),
        LocalUpdateRequest(
            copies=[_adapter(1.0), _adapter(2.0)],
            base={"v.lora_A.weight": torch.zeros(2, 3)},
            loss="npo",
            epochs=2,
            batch_size=4,
            max_steps=5,
            lr=1e-3,
            lr_scale=0.1,
            ranks={A: [0, 1], B: [1]},
            retain="proxy",
            loss_params={"beta": 0.5, "gamma": 1},
            seed_round=40_001,
        ),
        LocalUpdateRequest(
            copies=[{k: v.half() for k, v in _adapter().items()}],
            budget=1 / 6,
            max_steps=2,
        ),
        LocalUpdateRequest(
            copies=[_adapter()],
            loss="gd",
            optimizer="sophia",
            optimizer_params={"rho": 0.04, "bs": 5120},
            weight_decay=0.1,
            neurons={B: [0, 2]},
        ),
        AttributionRequest(_adapter(), steps=4, batch_size=2),
        TokenAccuracyRequest(_adapter()),
        LayerGramRequest(_adapter()),
        LayerGramRequest(_adapter(), max_items=12),
    ]


def _replies():
    return [
        HelloReply(
            client_id=2, num_examples=30, local_data=True, data_version=(1 << 56) | 5
        ),
        TrainReply(
            _adapter(),
            num_examples=30,
            client_id=1,
            train_loss=0.75,
            local_steps=8,
            tokens=640,
            train_seconds=1.5,
        ),
        TrainReply(
            _adapter(),
            num_examples=30,
            client_id=1,
            train_loss=0.75,
            local_steps=8,
            tokens=640,
            train_seconds=1.5,
            dual_loss_k=0.3,
            dual_loss_v=0.4,
        ),
        EvaluateReply(q_a_prob=0.4, eval_seconds=0.1, num_examples=30, client_id=0),
        AuditReply(audit_gap=0.05, num_examples=24),
        LocalUpdateReply(
            [_adapter(1.0), _adapter(2.0)],
            client_id=2,
            num_examples=30,
            local_steps=4,
            tokens=100,
            train_seconds=0.5,
            loss=2.5,
        ),
        AttributionReply(
            [torch.tensor([0.5, -1.0, 2.0]), torch.zeros(3)],
            client_id=2,
            num_examples=30,
            passes=12,
            attribution_seconds=0.3,
        ),
        TokenAccuracyReply(token_accuracy=0.25, num_examples=30),
        LayerGramReply({A: torch.eye(3)}, num_examples=30, tokens=400),
    ]


def _same(a, b) -> None:
    """Two messages encode to the same fields and bit-identical arrays."""
    assert type(a) is type(b)
    (fa, aa), (fb, ab) = a.to_fields(), b.to_fields()
    assert fa == fb
    assert (aa is None) == (ab is None)
    if aa is not None:
        assert list(aa) == list(ab)
        for k in aa:
            assert aa[k].dtype == ab[k].dtype and torch.equal(aa[k], ab[k]), k


def test_every_kind_has_a_request_and_a_reply_and_both_are_tested():
    assert set(REQUESTS) == set(REPLIES)
    assert set(REQUESTS) == {
        "hello",
        "train",
        "evaluate",
        "audit",
        "local-update",
        "attribution",
        "token-accuracy",
        "layer-grams",
    }
    assert {r.kind for r in _requests()} == set(REQUESTS)
    assert {r.kind for r in _replies()} == set(REPLIES)


@pytest.mark.parametrize("request_", _requests(), ids=lambda r: r.kind)
def test_requests_round_trip_through_fields(request_):
    fields, arrays = request_.to_fields()
    assert fields["kind"] == request_.kind
    _same(decode_request(fields, arrays), request_)


@pytest.mark.parametrize("reply", _replies(), ids=lambda r: r.kind)
def test_replies_round_trip_through_fields(reply):
    fields, arrays = reply.to_fields()
    assert "kind" not in fields  # a reply's kind is its request's
    _same(decode_reply(reply.kind, fields, arrays), reply)


def test_dicts_travel_as_typed_key_families_not_json():
    fields, arrays = _requests()[6].to_fields()
    assert fields[f"ranks.{A}"] == [0, 1] and fields[f"ranks.{B}"] == [1]
    assert fields["loss-params.beta"] == 0.5 and fields["loss-params.gamma"] == 1.0
    assert not any(isinstance(v, str) and v.startswith("{") for v in fields.values())
    assert list(arrays) == [f"copy0.{A}", f"copy0.{B}", f"copy1.{A}", f"copy1.{B}"] + [
        "base.v.lora_A.weight"
    ]
    # unset options do not travel: the client takes the run's
    fields, _ = _requests()[5].to_fields()
    assert "epochs" not in fields and "batch-size" not in fields and "lr" not in fields


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"kind": "local-update", "los": "nll"},
            "local-update request: unknown key 'los'",
        ),
        ({"kind": "local-update", "epochs": 1.5}, "'epochs' must be an int, got float"),
        ({"kind": "local-update", "epochs": True}, "'epochs' must be an int, got bool"),
        ({"kind": "local-update", "lr": "0.1"}, "'lr' must be a number, got str"),
        ({"kind": "local-update", "loss": 3}, "'loss' must be a str"),
        ({"kind": "local-update", f"ranks.{A}": [0.5]}, f"'ranks.{A}' must be a non"),
        ({"kind": "local-update", f"ranks.{A}": []}, f"'ranks.{A}' must be a non"),
        ({"kind": "local-update", "ranks": [1]}, "unknown key 'ranks'"),
        ({"kind": "local-update", "loss-params.beta": "x"}, "'loss-params.beta'"),
        ({"kind": "local-update", "loss-params.beta": float("nan")}, "finite"),
        ({"kind": "local-update", "q-loss": "nll"}, "unknown key 'q-loss'"),
        ({"kind": "train"}, "train request: missing key 'server-round'"),
        ({"kind": "train", "server-round": 1, "phase": "train"}, "unknown key 'phase'"),
        ({"kind": "train", "server-round": 1, "dual-prototype": ["a"]}, "list of num"),
        ({"kind": "hello", "x": 1}, "hello request: unknown key 'x'"),
        ({"kind": "layer-grams", "max-items": -1}, "'max-items' must be >= 0"),
        ({"kind": "layer-grams", "max-items": 1.0}, "'max-items' must be an int"),
        ({"kind": "token-accuracy", "tau": 0.1}, "unknown key 'tau'"),
        ({"kind": "recover"}, "unknown request kind 'recover'"),
        ({}, "unknown request kind None"),
    ],
)
def test_unknown_missing_and_ill_typed_request_keys_are_refused(fields, match):
    arrays = {"copy0.w": torch.zeros(2)}
    if fields.get("kind") in ("hello",):
        arrays = None
    if fields.get("kind") == "train":
        arrays = {"w": torch.zeros(2)}
    with pytest.raises(ProtocolError, match=match):
        decode_request(fields, arrays)


@pytest.mark.parametrize(
    ("kind", "fields", "arrays", "match"),
    [
        ("hello", {"client-id": 0}, None, "hello reply: missing key 'num-examples'"),
        (
            "hello",
            {"client-id": 0, "num-examples": 3},
            None,
            "hello reply: missing key 'local-data'",
        ),
        (
            "hello",
            {"client-id": 0, "num-examples": 3, "local-data": 2},
            None,
            "'local-data' must be a flag \\(0 or 1\\), got int 2",
        ),
        (
            "hello",
            {"client-id": 0, "num-examples": 3, "local-data": "/data/c0.jsonl"},
            None,
            "'local-data' must be a flag",
        ),
        (
            "hello",
            {"client-id": 0, "num-examples": 3.0},
            None,
            "'num-examples' must be an int",
        ),
        (
            "audit",
            {"audit-gap": 0.1, "num-examples": 3, "x": 1},
            None,
            "unknown key 'x'",
        ),
        (
            "audit",
            {"audit-gap": 0.1, "num-examples": 3},
            {"w": torch.zeros(1)},
            "takes none",
        ),
        ("train", {}, None, "train reply: carries no adapter"),
        ("local-update", {}, {"base.w": torch.zeros(1)}, "returns base"),
        ("local-update", {}, {"delta.w": torch.zeros(1)}, "unexpected array 'delta.w'"),
        ("nope", {}, None, "unknown reply kind 'nope'"),
    ],
)
def test_bad_replies_are_refused(kind, fields, arrays, match):
    full = {r.kind: r.to_fields()[0] for r in _replies()}
    if kind in ("local-update", "train"):
        fields = dict(full[kind])
    with pytest.raises(ProtocolError, match=match):
        decode_reply(kind, fields, arrays)


def test_requests_are_checked_when_built():
    with pytest.raises(ProtocolError, match="local-update request: carries no copy"):
        LocalUpdateRequest(copies=[])
    with pytest.raises(ProtocolError, match="'max-steps' must be an int"):
        LocalUpdateRequest(copies=[_adapter()], max_steps=2.5)
    with pytest.raises(ProtocolError, match="'budget' request sizes its own"):
        LocalUpdateRequest(copies=[_adapter()], budget=0.5, max_steps=0)
    # ints where floats go are floats, as the client would read them
    assert LocalUpdateRequest(copies=[_adapter()], lr=1).lr == 1.0


def test_copy_packing_round_trips_and_refuses_what_does_not_parse():
    copies = [_adapter(1.0), _adapter(2.0), _adapter(3.0)]
    flat = pack_copies(copies, {"v": torch.ones(1)})
    back, base = unpack_copies(flat)
    assert len(back) == 3 and list(base) == ["v"]
    assert all(torch.equal(back[k][n], copies[k][n]) for k in range(3) for n in (A, B))
    assert all(back[k][n] is copies[k][n] for k in range(3) for n in (A, B))
    gap = {k: v for k, v in flat.items() if not k.startswith("copy1.")}
    with pytest.raises(ProtocolError, match=r"copy indices \[0, 2\] are not 0..m-1"):
        unpack_copies(gap)
    with pytest.raises(ProtocolError, match="unexpected array 'stray'"):
        unpack_copies({**flat, "stray": torch.zeros(1)})
    with pytest.raises(ProtocolError, match="'copy0.x' is not a tensor"):
        unpack_copies({"copy0.x": [1.0]})
    with pytest.raises(ProtocolError, match="no copies"):
        pack_copies([])


def test_the_run_travels_without_the_method_the_departure_or_server_paths():
    cfg = RunConfig.from_flat(
        {
            "preset": "tiny",
            "num-clients": 2,
            "depart": "1",
            "seed": 4,
            "lora-r": 4,
            "method": "mpu",
            "method-kappa": 0.2,
            "out-dir": "/srv/fed/runs/secret-study",
            "federation-dir": "/srv/fed/federation",
            "history-key-file": "/srv/fed/keys/history.key",
            "receipt-key-file": "/srv/fed/keys/receipt.pem",
            "eval-max-items": 7,
            "strategy": "fedavgm",
            "x-note": "kept",
        }
    )
    run = encode_run(cfg)
    # exactly the client's keys (written out by hand; the preset-dependent ones
    # only where given)
    assert set(run) == {
        "preset",
        "model-path",
        "data-dir",
        "seed",
        "num-clients",
        "people-per-client",
        "holdout-people",
        "qa-per-person",
        "general-probes",
        "domains",
        "audit-fraction",
        "lora-r",
        "lora-dropout",
        "dual-adapter",
        "dual-k-weight",
        "dual-v-weight",
        "dual-layer",
        "x-note",
    }
    assert (run["num-clients"], run["seed"], run["lora-r"]) == (2, 4, 4)
    back = decode_run(run)
    # the client's view: no departure known (reading it is an error), the rest
    # as the server's for what the client reads
    assert back.depart == ""
    with pytest.raises(ConfigError, match="--depart"):
        back.departed()
    assert back.method_options == {} and back.extra == {"x-note": "kept"}
    assert back.train_spec() == cfg.train_spec() and back.lora_spec() == cfg.lora_spec()
    assert (back.seed, back.num_clients) == (4, 2)
    with pytest.raises(ProtocolError, match="run config: key 'method' does not travel"):
        decode_run({**run, "method": "mpu"})
    with pytest.raises(ProtocolError, match="'method-kappa' does not travel"):
        decode_run({**run, "method-kappa": 0.2})
    for key, value in (
        ("depart", "1"),
        ("out-dir", "x"),
        ("history-key-file", "k"),
        ("strategy", "fedavg"),
    ):
        with pytest.raises(ProtocolError, match=f"{key!r} does not travel"):
            decode_run({**run, key: value})
    with pytest.raises(ConfigError, match="unknown config key"):
        decode_run({**run, "no-such-key": 1})


# ------------------------------------------------------------- through Flower
@pytest.fixture
def flower():
    """Flower's records, serialised as on the wire (protobuf), both ways."""
    from flwr.app import Message, MessageType
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1

    def send(content, message_type=MessageType.QUERY):
        msg = Message(content=content, message_type=message_type, dst_node_id=7)
        return message_from_proto(message_to_proto(msg))

    def back(reply):
        return message_from_proto(message_to_proto(reply))

    return send, back


@pytest.mark.parametrize(
    ("request_", "reply"),
    list(zip(_requests()[:6], [_replies()[i] for i in (0, 1, 2, 3, 4, 5)], strict=True))
    + [(_requests()[6], _replies()[5]), (_requests()[7], _replies()[5])],
    ids=lambda r: r.kind,
)
def test_every_kind_round_trips_through_flower_records(flower, request_, reply):
    """Server encoder -> protobuf -> client decoder, and back for the reply."""
    from clients.wire import decode_request as client_decode
    from clients.wire import encode_reply
    from server.channel import decode_reply as server_decode
    from server.channel import encode_request, run_record

    send, back = flower
    cfg = RunConfig.from_flat({"preset": "tiny", "method": "foul", "seed": 3})
    msg = send(encode_request(request_, run_record(cfg)))
    assert set(msg.content.config_records) == {"config", "run"}
    got, run = client_decode(msg)
    _same(got, request_)
    assert run.seed == 3 and run.method_options == {}
    answer = back(encode_reply(msg, reply))
    decoded = server_decode(reply.kind, answer)
    _same(decoded, reply)  # fp32 adapters: the server's fp32 cast changes nothing


def test_fp16_deltas_come_back_as_fp32_on_the_server(flower):
    from clients.wire import encode_reply
    from server.channel import decode_reply as server_decode
    from server.channel import encode_request, run_record

    send, back = flower
    msg = send(encode_request(HelloRequest(), run_record(RunConfig())))
    half = LocalUpdateReply(
        [{A: torch.ones(2, 3, dtype=torch.float16)}],
        client_id=0,
        num_examples=1,
        local_steps=1,
        tokens=1,
        train_seconds=0.0,
        loss=0.0,
    )
    got = server_decode("local-update", back(encode_reply(msg, half)))
    assert got.deltas[0][A].dtype == torch.float32


def test_the_client_refuses_unknown_keys_in_a_flower_message(flower):
    from flwr.app import ConfigRecord, RecordDict

    from clients.client_app import query
    from clients.wire import decode_request as client_decode
    from server.channel import run_record

    send, _ = flower
    run = run_record(RunConfig())
    bad = send(
        RecordDict({"config": ConfigRecord({"kind": "audit", "x": 1}), "run": run})
    )
    with pytest.raises(ProtocolError, match="audit request: unknown key 'x'"):
        client_decode(bad)
    no_run = send(RecordDict({"config": ConfigRecord({"kind": "hello"})}))
    with pytest.raises(ProtocolError, match="no 'run' record"):
        client_decode(no_run)
    train = send(RecordDict({"config": ConfigRecord({"kind": "train"}), "run": run}))
    with pytest.raises(ProtocolError, match="missing key 'server-round'"):
        query(train, None)


class _LoopbackGrid:
    """A grid whose nodes answer ``local-update`` with zero deltas, recording
    what each node received (decoded by the client's decoder)."""

    def __init__(self):
        self.received = {}

    def send_and_receive(self, messages, timeout=None):
        from clients.wire import decode_request as client_decode
        from clients.wire import encode_reply

        out = []
        for msg in messages:
            req, _ = client_decode(msg)
            self.received[msg.metadata.dst_node_id] = req
            zero = [{k: torch.zeros_like(v) for k, v in c.items()} for c in req.copies]
            reply = LocalUpdateReply(
                zero,
                client_id=0,
                num_examples=1,
                local_steps=1,
                tokens=1,
                train_seconds=0.0,
                loss=0.0,
            )
            out.append(encode_reply(msg, reply))
        return out


def test_the_channel_sends_per_client_payloads_as_given(flower):
    from server.channel import ChannelError, FlowerChannel

    grid = _LoopbackGrid()
    channel = FlowerChannel(grid, RunConfig(), {101: 0, 102: 1})
    one, two = (LocalUpdateRequest(copies=[_adapter(s)]) for s in (1.0, 2.0))
    replies = channel.query({0: one, 1: two})
    assert sorted(replies) == [0, 1]
    assert torch.equal(grid.received[101].copies[0][A], one.copies[0][A])
    assert torch.equal(grid.received[102].copies[0][A], two.copies[0][A])
    assert all(isinstance(r, LocalUpdateReply) for r in replies.values())
    with pytest.raises(ChannelError, match="one kind of request"):
        channel.query({0: one, 1: AuditRequest(_adapter())})
    with pytest.raises(ChannelError, match=r"client\(s\) \[5\] are not connected"):
        channel.query({5: one})


def test_a_client_that_fails_or_stays_silent_is_named_and_the_others_kept(flower):
    """Node 102 answers with an error and node 103 not at all: the error names
    both and why, and carries node 101's decoded reply."""
    from flwr.app import Error, Message

    from fed_unlearn.methods import ClientFailure
    from server.channel import ChannelError, FlowerChannel

    class Flaky(_LoopbackGrid):
        def send_and_receive(self, messages, timeout=None):
            msgs = list(messages)
            ok = super().send_and_receive(msgs[:1], timeout)
            bad = Message(Error(code=0, reason="ValueError: boom"), reply_to=msgs[1])
            return [*ok, bad]  # the third node's reply never comes

    channel = FlowerChannel(Flaky(), RunConfig(), {101: 0, 102: 1, 103: 2}, timeout=5)
    req = LocalUpdateRequest(copies=[_adapter(1.0)])
    with pytest.raises(ChannelError) as got:
        channel.query(dict.fromkeys((0, 1, 2), req))
    exc = got.value
    assert isinstance(exc, ClientFailure)
    assert sorted(exc.replies) == [0] and isinstance(exc.replies[0], LocalUpdateReply)
    assert "boom" in exc.failed[1] and "did not answer" in exc.failed[2]
    assert "client 1 failed" in str(exc) and "client 2 did not answer" in str(exc)


def test_a_flag_travels_as_the_int_0_or_1():
    """Flower metrics hold numbers: ``local-data`` is 1 or 0 on the wire, a bool
    in the typed reply."""
    fields, _ = HelloReply(
        client_id=0, num_examples=3, local_data=True, data_version=7
    ).to_fields()
    assert fields == {
        "client-id": 0,
        "num-examples": 3,
        "local-data": 1,
        "data-version": 7,
    }
    assert type(fields["local-data"]) is int
    back = decode_reply("hello", {**fields, "local-data": 0}, None)
    assert back.local_data is False
