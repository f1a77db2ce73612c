from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fed_unlearn.history import HistoryError, HistoryStore, RoundRecord

PFX = "base_model.model.model.layers.{}.self_attn.q_proj"
OUT, IN, R = 64, 96, 8


def keys():
    out = []
    for layer in range(2):
        out += [
            f"{PFX.format(layer)}.lora_A.weight",
            f"{PFX.format(layer)}.lora_B.weight",
        ]
    return out


def rand_state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k in keys():
        shape = (R, IN) if "lora_A" in k else (OUT, R)
        state[k] = scale * torch.randn(shape, generator=g)
    return state


def make_record(rnd, clients=(0, 1, 2), rejected=None):
    rejected = rejected or {}
    return RoundRecord(
        round=rnd,
        global_state=rand_state(1000 + rnd),
        client_deltas={c: rand_state(100 * rnd + c, 0.01) for c in clients},
        num_examples={c: 10 + c for c in clients} | dict.fromkeys(rejected, 5),
        participants=sorted(clients),
        rejected=rejected,
    )


def snapshot(root):
    """Names, sizes and contents of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def assert_state_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------- round trip


def reseal(root):
    """Recompute every checksum of a plaintext store after a test edited its
    files, so that the loader's deeper checks (not the checksum) meet the edit."""
    import hashlib

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    meta = json.loads((root / "meta.json").read_text())
    for r in meta["rounds"]:
        rdir = root / f"round_{r:04d}"
        try:
            rmeta = json.loads((rdir / "meta.json").read_text())
        except ValueError:
            rmeta = None
        if rmeta is not None:
            rmeta["files"] = {
                n: sha(rdir / n) if (rdir / n).is_file() else v
                for n, v in rmeta["files"].items()
            }
            (rdir / "meta.json").write_text(json.dumps(rmeta))
        meta["round_meta_sha256"][str(r)] = sha(rdir / "meta.json")
    if (root / "final.safetensors").is_file():
        meta["final_sha256"] = sha(root / "final.safetensors")
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True).encode()
    ).hexdigest()
    (root / "meta.json").write_text(json.dumps(meta))


def test_round_trip_fp32_exact(tmp_path):
    store = HistoryStore(tmp_path / "h")
    recs = [make_record(1), make_record(2, clients=(0, 2), rejected={1: "NaN in B"})]
    for rec in recs:
        n = store.append(rec)
        assert n == store.round_nbytes(rec.round) > 0
    final = rand_state(7)
    store.set_final(final)

    again = HistoryStore(tmp_path / "h")  # fresh object, reads from disk
    assert again.rounds() == [1, 2]
    assert again.clients() == {0, 1, 2}
    for rec in recs:
        got = again.load(rec.round)
        assert got.round == rec.round
        assert_state_equal(got.global_state, rec.global_state)
        assert list(got.client_deltas) == rec.participants
        for c, d in rec.client_deltas.items():
            assert_state_equal(got.client_deltas[c], d)
        assert got.num_examples == rec.num_examples
        assert got.participants == rec.participants
        assert got.rejected == rec.rejected
    assert_state_equal(again.final(), final)
    again.validate()

    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["rounds"] == [1, 2]
    assert meta["schema"][keys()[0]] == [R, IN]
    assert sorted(os.listdir(tmp_path / "h" / "round_0002")) == [
        "client_0.safetensors",
        "client_2.safetensors",
        "global.safetensors",
        "meta.json",
    ]
    assert not [n for n in os.listdir(tmp_path / "h") if n.startswith(".")]


def test_round_trip_fp16_within_tolerance_and_half_size(tmp_path):
    s32 = HistoryStore(tmp_path / "h32")
    s16 = HistoryStore(tmp_path / "h16", dtype="float16")
    rec = make_record(1)
    n32, n16 = s32.append(rec), s16.append(rec)
    assert 0.45 < n16 / n32 < 0.55
    assert s16.round_nbytes(1) == n16
    assert s16.dtype == "float16"

    got = s16.load(1)
    for k, v in rec.global_state.items():
        assert got.global_state[k].dtype == torch.float32
        torch.testing.assert_close(got.global_state[k], v, rtol=1e-3, atol=1e-4)
    for c, d in rec.client_deltas.items():
        for k, v in d.items():
            torch.testing.assert_close(got.client_deltas[c][k], v, rtol=1e-3, atol=1e-6)
    # the file really holds float16
    raw = load_file(str(tmp_path / "h16" / "round_0001" / "global.safetensors"))
    assert all(v.dtype == torch.float16 for v in raw.values())


def test_reader_adopts_stored_dtype_writer_must_match(tmp_path):
    HistoryStore(tmp_path / "h", dtype="float16").append(make_record(1))
    reader = HistoryStore(tmp_path / "h")  # default float32
    assert reader.dtype == "float16"
    assert reader.load(1).global_state[keys()[0]].dtype == torch.float32
    with pytest.raises(HistoryError, match="stores float16"):
        reader.append(make_record(2))


def test_append_does_not_modify_the_record(tmp_path):
    rec = make_record(1)
    before = {k: v.clone() for k, v in rec.global_state.items()}
    HistoryStore(tmp_path / "h", dtype="float16").append(rec)
    assert_state_equal(rec.global_state, before)


# ------------------------------------------------------------ append-only


def test_append_existing_round_raises_and_writes_nothing(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    before = snapshot(tmp_path / "h")
    with pytest.raises(HistoryError, match="round 1 is already recorded"):
        store.append(make_record(1))
    assert snapshot(tmp_path / "h") == before


def test_append_non_consecutive_round_raises_and_writes_nothing(tmp_path):
    store = HistoryStore(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"round 2 is not the next.*expected 1"):
        store.append(make_record(2))
    assert not (tmp_path / "h").exists()
    store.append(make_record(1))
    before = snapshot(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"round 3 is not the next.*expected 2"):
        store.append(make_record(3))
    assert snapshot(tmp_path / "h") == before
    assert store.rounds() == [1]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: setattr(r, "participants", [0, 1]), "participants"),
        (lambda r: setattr(r, "num_examples", {0: 1, 1: 1}), "lacks participants"),
        (
            lambda r: setattr(r, "rejected", {1: "dup"}),
            "both participants and rejected",
        ),
        (lambda r: setattr(r, "round", 0), "round must be an int >= 1"),
        (
            lambda r: r.client_deltas[1].__setitem__(
                keys()[1], torch.full((OUT, R), float("nan"))
            ),
            r"client_deltas\[1\].*NaN/Inf",
        ),
        (
            lambda r: r.client_deltas[2].__setitem__(keys()[0], torch.zeros(R, IN + 1)),
            r"client_deltas\[2\].*shape",
        ),
        (
            lambda r: r.client_deltas[0].pop(keys()[3]),
            r"client_deltas\[0\].*missing",
        ),
    ],
)
def test_inconsistent_record_rejected_and_nothing_written(tmp_path, mutate, match):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    before = snapshot(tmp_path / "h")
    rec = make_record(2)
    mutate(rec)
    with pytest.raises(HistoryError, match=match):
        store.append(rec)
    assert snapshot(tmp_path / "h") == before


def test_schema_fixed_by_first_round(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    rec = make_record(2)
    rec.global_state["extra.weight"] = torch.zeros(3)
    with pytest.raises(HistoryError, match=r"global_state.*unexpected.*extra.weight"):
        store.append(rec)
    with pytest.raises(HistoryError, match="final state"):
        store.set_final({keys()[0]: torch.zeros(R, IN)})


def test_fp16_overflow_rejected(tmp_path):
    store = HistoryStore(tmp_path / "h", dtype="float16")
    rec = make_record(1)
    rec.global_state[keys()[0]][0, 0] = 1e6
    with pytest.raises(HistoryError, match="overflows float16"):
        store.append(rec)
    assert not (tmp_path / "h").exists()


def test_empty_round_allowed(tmp_path):
    store = HistoryStore(tmp_path / "h")
    rec = make_record(1, clients=(), rejected={3: "shape mismatch"})
    store.append(rec)
    got = store.load(1)
    assert got.participants == [] and got.client_deltas == {}
    assert got.rejected == {3: "shape mismatch"} and got.num_examples == {3: 5}
    assert store.clients() == set()


# --------------------------------------------------------- missing / unknown


def test_missing_store_meta_round_final(tmp_path):
    with pytest.raises(HistoryError, match="does not exist"):
        HistoryStore(tmp_path / "nope").rounds()
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match="no meta.json"):
        HistoryStore(tmp_path / "empty").load(1)
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    with pytest.raises(HistoryError, match=r"unknown round 5.*\[1\]"):
        store.load(5)
    with pytest.raises(HistoryError, match="unknown round 5"):
        store.round_nbytes(5)
    with pytest.raises(HistoryError, match="set_final"):
        store.final()


def test_bad_dtype_argument():
    with pytest.raises(ValueError, match="dtype"):
        HistoryStore("x", dtype="int8")


def test_refuses_to_write_over_store_without_meta(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    os.remove(tmp_path / "h" / "meta.json")
    with pytest.raises(HistoryError, match="no meta.json"):
        store.append(make_record(1))


# ------------------------------------------------------- corruption on disk


def test_truncated_safetensors_raises_history_error(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    path = tmp_path / "h" / "round_0001" / "client_1.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"client_1\.safetensors.*cannot read"):
        store.load(1)
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"client_1\.safetensors"):
        store.validate()


def test_garbage_header_raises_history_error(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    path = tmp_path / "h" / "round_0001" / "global.safetensors"
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(HistoryError, match=r"global\.safetensors"):
        store.load(1)


def test_wrong_shape_injected_raises_naming_file_and_key(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    path = tmp_path / "h" / "round_0001" / "client_2.safetensors"
    bad = load_file(str(path))
    bad[keys()[1]] = torch.zeros(OUT, R + 1)
    save_file(bad, str(path))
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError) as e:
        store.load(1)
    msg = str(e.value)
    assert "client_2.safetensors" in msg and keys()[1] in msg
    assert f"({OUT}, {R + 1})" in msg and f"expected ({OUT}, {R})" in msg


def test_wrong_dtype_or_nan_injected(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    path = tmp_path / "h" / "round_0001" / "client_0.safetensors"
    good = load_file(str(path))
    save_file({k: v.double() for k, v in good.items()}, str(path))
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"client_0.*dtype torch.float64"):
        store.load(1)
    good[keys()[2]][3, 4] = float("inf")
    save_file(good, str(path))
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"client_0.*1 NaN/Inf"):
        store.load(1)


def test_missing_client_file_or_stray_key(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    rdir = tmp_path / "h" / "round_0001"
    os.remove(rdir / "client_1.safetensors")
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match="participants.*do not match"):
        store.load(1)
    save_file(
        {**rand_state(3), "stray": torch.zeros(1)}, str(rdir / "client_1.safetensors")
    )
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match="unexpected.*stray"):
        store.load(1)


def test_corrupt_round_meta(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    (tmp_path / "h" / "round_0001" / "meta.json").write_text("{not json")
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match=r"round_0001.meta\.json.*JSON"):
        store.load(1)
    reseal(tmp_path / "h")
    with pytest.raises(HistoryError, match="JSON"):
        store.clients()


def test_validate_lists_all_problems(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(make_record(1))
    store.append(make_record(2))
    for r in (1, 2):
        with open(tmp_path / "h" / f"round_000{r}" / "global.safetensors", "r+b") as f:
            f.truncate(10)
    with pytest.raises(HistoryError, match=r"2 problem\(s\).*round_0001.*round_0002"):
        store.validate()


# ------------------------------------------------------------ crash safety


def test_leftover_tmp_dir_ignored_and_cleaned(tmp_path):
    root = tmp_path / "h"
    store = HistoryStore(root)
    store.append(make_record(1))
    # a crash while writing round 2 left a partial temp dir behind
    tmp = root / ".tmp_round_0002"
    tmp.mkdir()
    (tmp / "global.safetensors").write_bytes(b"partial")
    assert store.rounds() == [1]
    store.validate()
    assert store.clients() == {0, 1, 2}
    store.append(make_record(2))
    assert not tmp.exists()
    assert store.rounds() == [1, 2]
    store.validate()


def test_renamed_but_uncommitted_round_ignored_and_replaced(tmp_path):
    # a crash between the rename and the meta.json update leaves round_0002 unlisted
    root = tmp_path / "h"
    store = HistoryStore(root)
    store.append(make_record(1))
    (root / "round_0002").mkdir()
    (root / "round_0002" / "junk").write_bytes(b"x")
    assert store.rounds() == [1]
    with pytest.raises(HistoryError, match="unknown round 2"):
        store.load(2)
    rec = make_record(2)
    store.append(rec)
    assert not (root / "round_0002" / "junk").exists()
    assert_state_equal(store.load(2).global_state, rec.global_state)


def test_set_final_replaces(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.set_final(rand_state(1))  # before any round: defines the schema
    store.append(make_record(1))
    store.set_final(rand_state(2))
    assert_state_equal(store.final(), rand_state(2))
    assert not [n for n in os.listdir(tmp_path / "h") if n.startswith(".")]


def test_first_state_must_be_a_nonempty_dict(tmp_path):
    store = HistoryStore(tmp_path / "h")
    with pytest.raises(HistoryError, match="non-empty dict"):
        store.set_final({})
    rec = make_record(1)
    rec.global_state = [1, 2]  # type: ignore[assignment]
    with pytest.raises(HistoryError, match="global_state"):
        store.append(rec)
    assert not (tmp_path / "h").exists()


def test_foul_reads_the_updates_there_are_and_requires_the_departed(tmp_path):
    """A client lost before its first reply has no update in the history: FOUL's
    history read leaves it out unless it is required (the departed must be
    there: their updates are what is removed)."""
    from fed_unlearn.methods.base import MissingRequirementError
    from fed_unlearn.methods.foul.method import cached_updates

    store = HistoryStore(tmp_path / "h")
    for r in (1, 2):
        store.append(make_record(r, clients=(0, 1), rejected={2: "Node Unavailable"}))
    got = cached_updates(store, (0, 1, 2), "sum", required=(1,))
    assert sorted(got) == [0, 1]
    want = {
        k: -(a + b)
        for (k, a), b in zip(
            store.load(1).client_deltas[0].items(),
            store.load(2).client_deltas[0].values(),
            strict=True,
        )
    }
    assert all(torch.allclose(got[0][k], v) for k, v in want.items())
    with pytest.raises(MissingRequirementError, match=r"client\(s\) \[2\]"):
        cached_updates(store, (0, 1, 2), "sum", required=(2,))
    with pytest.raises(MissingRequirementError, match=r"\[2\]"):
        cached_updates(store, (0, 1, 2), "sum")
