"""Property-based tests (hypothesis): hostile or malformed input is a clear error
of the documented type that changes nothing, and aggregation keeps its laws."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fed_unlearn.adapters import InvalidUpdateError, validate_update
from fed_unlearn.aggregation import fedavg
from fed_unlearn.config import ConfigError, RunConfig
from fed_unlearn.data import DataFormatError
from fed_unlearn.data.jsonl import load_jsonl
from fed_unlearn.history import HistoryError, HistoryStore, RoundRecord

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

REF = {"m.lora_A": torch.zeros(2, 3), "m.lora_B": torch.zeros(3, 2)}

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


def _tensor(shape, elems=floats, dtype=torch.float32):
    n = math.prod(shape)
    return st.lists(elems, min_size=n, max_size=n).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32).reshape(shape).to(dtype)
    )


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
values = st.one_of(
    shapes.flatmap(_tensor),
    _tensor((2, 3), st.integers(-5, 5), torch.int64),
    st.integers(),
    st.text(max_size=5),
    st.none(),
)
updates = st.dictionaries(
    st.sampled_from(["m.lora_A", "m.lora_B", "m.lora_C", "", "x" * 40]),
    values,
    max_size=4,
)


@FAST
@given(updates)
def test_a_client_update_is_accepted_only_when_it_fits(update):
    """Any dict a client could send: accepted exactly when keys, shapes and dtype
    match and every value is finite; otherwise InvalidUpdateError, and the update
    itself is left as it was."""
    before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in update.items()
    }
    fits = set(update) == set(REF) and all(
        isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and tuple(v.shape) == tuple(REF[k].shape)
        and bool(torch.isfinite(v).all())
        for k, v in update.items()
    )
    if fits:
        validate_update(update, REF)
    else:
        with pytest.raises(InvalidUpdateError, match="invalid update"):
            validate_update(update, REF)
    for k, v in update.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all()


@FAST
@given(
    st.lists(
        st.tuples(_tensor((3,), finite), st.floats(min_value=0.1, max_value=100)),
        min_size=1,
        max_size=5,
    ),
    st.randoms(use_true_random=False),
    st.floats(min_value=0.01, max_value=100),
)
def test_fedavg_is_a_convex_combination_invariant_to_order_and_weight_scale(
    parts, rnd, c
):
    states = [{"w": t} for t, _ in parts]
    weights = [w for _, w in parts]
    avg = fedavg(states, weights)["w"]
    stack = torch.stack([t for t, _ in parts]).double()
    assert (avg.double() >= stack.min(0).values - 1e-3).all()
    assert (avg.double() <= stack.max(0).values + 1e-3).all()
    # the hand formula Σ w_i x_i / Σ w_i, in float64
    want = sum(w * t.double() for t, w in parts) / sum(weights)
    assert torch.allclose(avg.double(), want, atol=1e-3, rtol=1e-5)
    order = list(range(len(parts)))
    rnd.shuffle(order)
    shuffled = fedavg([states[i] for i in order], [weights[i] for i in order])["w"]
    scaled = fedavg(states, [c * w for w in weights])["w"]
    assert torch.allclose(shuffled, avg, atol=1e-4)
    assert torch.allclose(scaled, avg, atol=1e-4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
lines = st.one_of(
    st.binary(max_size=60).map(lambda b: b),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"question": json_values, "answer": json_values},
        optional={
            "person": json_values,
            "perturbed_answer": json_values,
            "extra": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@FAST
@given(st.lists(lines, min_size=0, max_size=4))
def test_user_jsonl_loads_or_is_a_data_format_error_naming_the_file(
    tmp_path_factory, rows
):
    path = tmp_path_factory.mktemp("d") / "client_0.jsonl"
    path.write_bytes(b"\n".join(rows))
    try:
        items = load_jsonl(path)
    except DataFormatError as e:
        assert "client_0.jsonl" in str(e)
    else:
        assert items
        for it in items:
            assert isinstance(it.question, str) and isinstance(it.answer, str)


def _store(root):
    store = HistoryStore(root)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in REF.items()}
    store.append(
        RoundRecord(
            round=1,
            global_state=state,
            client_deltas={0: state, 1: state},
            num_examples={0: 3, 1: 4},
            participants=[0, 1],
        )
    )
    store.set_final(state)
    return store, state


files = st.sampled_from(
    [
        "meta.json",
        "final.safetensors",
        "round_0001/meta.json",
        "round_0001/global.safetensors",
        "round_0001/client_1.safetensors",
    ]
)


@FAST
@given(
    files, st.integers(min_value=0), st.binary(min_size=1, max_size=16), st.booleans()
)
def test_a_fuzzed_history_file_is_a_history_error_naming_it(
    tmp_path_factory, rel, pos, junk, cut
):
    """Overwrite or truncate any file of a store: loading raises HistoryError
    naming that file (never another exception, never different numbers)."""
    root = tmp_path_factory.mktemp("h") / "h"
    store, state = _store(root)
    path = root / rel
    data = path.read_bytes()
    i = pos % len(data)
    new = data[:i] if cut else data[:i] + junk + data[i + len(junk) :]
    if new == data:
        return
    path.write_bytes(new)
    with pytest.raises(HistoryError) as e:
        store.load(1)
        store.final()
    assert rel.split("/")[-1] in str(e.value)


@FAST
@given(json_values)
def test_a_fuzzed_root_meta_is_a_history_error(tmp_path_factory, value):
    root = tmp_path_factory.mktemp("h") / "h"
    store, _ = _store(root)
    (root / "meta.json").write_text(json.dumps(value))
    with pytest.raises(HistoryError, match="meta.json"):
        store.load(1)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "num-server-rounds",
                "lr",
                "lora-r",
                "depart",
                "num-clients",
                "seed",
                "bogus-key",
                "batch-size",
            ]
        ),
        st.one_of(
            st.integers(-3, 5),
            st.floats(allow_nan=True),
            st.text(max_size=4),
            st.booleans(),
        ),
        max_size=4,
    )
)
def test_a_config_is_valid_or_a_config_error_naming_a_key(flat):
    try:
        cfg = RunConfig.from_flat({"preset": "tiny", **flat}).resolved()
    except ConfigError as e:
        assert any(k in str(e) for k in flat), (flat, str(e))
    else:
        assert int(cfg.num_server_rounds) >= 1
        assert float(cfg.lr) > 0 and math.isfinite(float(cfg.lr))
