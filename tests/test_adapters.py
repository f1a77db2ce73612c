from __future__ import annotations

import pytest
import torch

from fed_unlearn.adapters import (
    InvalidUpdateError,
    add,
    flatten,
    lora_pairs,
    nbytes,
    scale,
    sub,
    unflatten,
    validate_update,
)

PFX = "base_model.model.model.layers.0.self_attn"
QA = f"{PFX}.q_proj.lora_A.weight"
QB = f"{PFX}.q_proj.lora_B.weight"
VA = f"{PFX}.v_proj.lora_A.weight"
VB = f"{PFX}.v_proj.lora_B.weight"


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def small_state():
    # lora_A [r=1, in=3], lora_B [out=2, r=1]
    return {QA: t([[1.0, 2.0, 3.0]]), QB: t([[4.0], [5.0]])}


# ---------------------------------------------------------------- flatten


def test_flatten_uses_sorted_key_order():
    state = {"b": t([[3.0, 4.0]]), "a": t([1.0, 2.0]), "c": t(5.0)}
    vec = flatten(state)
    assert vec.dtype == torch.float32 and vec.dim() == 1
    assert torch.equal(vec, t([1.0, 2.0, 3.0, 4.0, 5.0]))
    # insertion order does not matter
    assert torch.equal(flatten(dict(reversed(state.items()))), vec)


def test_flatten_empty():
    assert flatten({}).shape == (0,)


def test_flatten_unflatten_round_trip_keeps_shapes_dtypes_order():
    like = {
        "z": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": t([[0.5], [1.5]], torch.float16),
        "m": t(7.0, torch.float64),
    }
    vec = flatten(like)
    assert torch.equal(vec, t([0.5, 1.5, 7.0, 0, 1, 2, 3, 4, 5]))
    back = unflatten(vec, like)
    assert list(back) == ["z", "a", "m"]
    for k in like:
        assert back[k].dtype == like[k].dtype
        assert back[k].shape == like[k].shape
        assert torch.equal(back[k], like[k])


def test_unflatten_returns_copies():
    like = {"a": torch.zeros(2)}
    vec = t([1.0, 2.0])
    out = unflatten(vec, like)
    vec[0] = 99.0
    assert torch.equal(out["a"], t([1.0, 2.0]))


def test_unflatten_length_mismatch():
    like = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="6 elements.*holds 7"):
        unflatten(torch.zeros(6), like)
    with pytest.raises(ValueError, match="1-D"):
        unflatten(torch.zeros(7, 1), like)


# ------------------------------------------------------------- arithmetic


def test_add_sub_scale_golden():
    a = {"x": t([[1.0, 2.0], [3.0, 4.0]]), "y": t([10.0])}
    b = {"x": t([[0.5, -1.0], [2.0, 0.0]]), "y": t([-4.0])}
    s = add(a, b)
    assert torch.equal(s["x"], t([[1.5, 1.0], [5.0, 4.0]]))
    assert torch.equal(s["y"], t([6.0]))
    d = sub(a, b)
    assert torch.equal(d["x"], t([[0.5, 3.0], [1.0, 4.0]]))
    assert torch.equal(d["y"], t([14.0]))
    c = scale(a, -0.5)
    assert torch.equal(c["x"], t([[-0.5, -1.0], [-1.5, -2.0]]))
    assert torch.equal(c["y"], t([-5.0]))
    # inputs untouched
    assert torch.equal(a["x"], t([[1.0, 2.0], [3.0, 4.0]]))


def test_add_sub_key_mismatch_names_keys():
    a = {"x": t([1.0]), "only_a": t([1.0])}
    b = {"x": t([1.0]), "only_b": t([1.0])}
    with pytest.raises(ValueError, match="only_a") as e:
        add(a, b)
    assert "only_b" in str(e.value)
    with pytest.raises(ValueError, match="only_a"):
        sub(a, b)


def test_add_shape_mismatch():
    with pytest.raises(ValueError, match=r"'x'.*\(2,\) vs \(3,\)"):
        add({"x": torch.zeros(2)}, {"x": torch.zeros(3)})


def test_nbytes():
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}
    assert nbytes(state) == 2 * 3 * 4 + 4 * 2
    assert nbytes({}) == 0


# ------------------------------------------------------------- lora_pairs


def test_lora_pairs_peft_keys():
    state = {
        VB: torch.zeros(2, 1),
        QA: torch.zeros(1, 3),
        QB: torch.zeros(2, 1),
        VA: torch.zeros(1, 3),
        "base_model.model.model.norm.weight": torch.zeros(3),  # not LoRA: ignored
        "base_model.model.embed.lora_embedding_A": torch.zeros(1, 10),
        "base_model.model.embed.lora_embedding_B": torch.zeros(3, 1),
    }
    pairs = lora_pairs(state)
    assert pairs == {
        "base_model.model.embed": (
            "base_model.model.embed.lora_embedding_A",
            "base_model.model.embed.lora_embedding_B",
        ),
        f"{PFX}.q_proj": (QA, QB),
        f"{PFX}.v_proj": (VA, VB),
    }
    assert list(pairs) == sorted(pairs)


def test_lora_pairs_unpaired():
    with pytest.raises(ValueError, match="unpaired.*v_proj.lora_A"):
        lora_pairs({QA: torch.zeros(1, 3), QB: torch.zeros(2, 1), VA: torch.zeros(1)})
    with pytest.raises(ValueError, match="unpaired.*q_proj.lora_B"):
        lora_pairs({QB: torch.zeros(2, 1)})


# -------------------------------------------------------- validate_update


def test_validate_update_accepts_good_update_and_modifies_nothing():
    ref = small_state()
    upd = {QA: t([[0.1, 0.2, 0.3]]), QB: t([[0.0], [1.0]], torch.float16)}
    before = {k: v.clone() for k, v in upd.items()}
    validate_update(upd, ref)
    assert set(upd) == set(before)
    for k in upd:
        assert torch.equal(upd[k], before[k])


def test_validate_update_missing_key():
    ref = small_state()
    with pytest.raises(InvalidUpdateError, match=r"missing 1 key\(s\).*lora_B"):
        validate_update({QA: ref[QA].clone()}, ref)


def test_validate_update_extra_keys_listed_a_few():
    ref = small_state()
    upd = {k: v.clone() for k, v in ref.items()}
    for i in range(8):
        upd[f"extra_{i}"] = torch.zeros(1)
    with pytest.raises(InvalidUpdateError, match="8 unexpected") as e:
        validate_update(upd, ref)
    msg = str(e.value)
    assert "extra_0" in msg and "(3 more)" in msg and "extra_7" not in msg


def test_validate_update_shape():
    ref = small_state()
    upd = {QA: torch.zeros(3, 1), QB: ref[QB].clone()}
    with pytest.raises(
        InvalidUpdateError, match=r"q_proj.lora_A.*got \(3, 1\), expected \(1, 3\)"
    ):
        validate_update(upd, ref)


def test_validate_update_nan_counted():
    ref = small_state()
    upd = {QA: t([[float("nan"), 1.0, float("nan")]]), QB: ref[QB].clone()}
    with pytest.raises(InvalidUpdateError, match="lora_A.*2 NaN and 0 Inf"):
        validate_update(upd, ref)
    assert torch.isnan(upd[QA]).sum() == 2  # untouched


def test_validate_update_inf_counted():
    ref = small_state()
    upd = {QA: ref[QA].clone(), QB: t([[float("inf")], [-float("inf")]])}
    with pytest.raises(InvalidUpdateError, match="lora_B.*0 NaN and 2 Inf"):
        validate_update(upd, ref)


def test_validate_update_integer_dtype():
    ref = small_state()
    upd = {QA: torch.zeros(1, 3, dtype=torch.int64), QB: ref[QB].clone()}
    with pytest.raises(
        InvalidUpdateError, match="lora_A.*non-floating dtype torch.int64"
    ):
        validate_update(upd, ref)


def test_validate_update_not_a_dict_or_tensor():
    ref = small_state()
    with pytest.raises(InvalidUpdateError, match="dict"):
        validate_update([1, 2], ref)  # type: ignore[arg-type]
    with pytest.raises(InvalidUpdateError, match="not a tensor"):
        validate_update({QA: [[1.0, 2.0, 3.0]], QB: ref[QB]}, ref)  # type: ignore[dict-item]


def test_validate_update_reports_all_problems():
    ref = small_state()
    upd = {QA: torch.zeros(1, 3, dtype=torch.int32), "junk": torch.zeros(1)}
    with pytest.raises(InvalidUpdateError, match=r"3 problem\(s\)"):
        validate_update(upd, ref)


def test_invalid_update_error_is_value_error():
    assert issubclass(InvalidUpdateError, ValueError)


def test_rank_slices_by_hand():
    """Ranks are rows of lora_A and columns of lora_B; put_ranks writes a slice
    back into a copy and leaves the rest (and the input) as they were."""
    from fed_unlearn.adapters import put_ranks, take_ranks

    a, b = "m.lora_A.weight", "m.lora_B.weight"
    ta, tb = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(3, 2)
    assert take_ranks(ta, a, [1]).tolist() == [[3.0, 4.0, 5.0]]
    assert take_ranks(tb, b, [0]).tolist() == [[0.0], [2.0], [4.0]]
    new_a = put_ranks(ta, a, [1], torch.full((1, 3), -1.0))
    assert new_a.tolist() == [[0.0, 1.0, 2.0], [-1.0, -1.0, -1.0]]
    new_b = put_ranks(tb, b, [1], torch.tensor([[7.0], [8.0], [9.0]]))
    assert new_b.tolist() == [[0.0, 7.0], [2.0, 8.0], [4.0, 9.0]]
    assert ta.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # input untouched
    with pytest.raises(ValueError, match=r"slice of ranks \[1\] has shape \(1, 3\)"):
        put_ranks(ta, a, [1], torch.zeros(3, 1))
    with pytest.raises(ValueError, match="has no ranks"):
        take_ranks(ta, "m.bias", [0])


@pytest.mark.parametrize(
    ("ranks", "needle"),
    [
        ([1], "must map tensor names"),
        ({"m.lora_C.weight": [0]}, "unknown adapter tensor"),
        ({"m.lora_A.weight": [2]}, r"distinct integers in \[0, 2\)"),
        ({"m.lora_B.weight": [0, 0]}, "distinct integers"),
        ({"m.lora_A.weight": []}, "distinct integers"),
        ({"m.lora_A.weight": [True]}, "distinct integers"),
        ({"m.lora_A.weight": "0"}, "distinct integers"),
    ],
)
def test_check_ranks_refuses_a_bad_selection(ranks, needle):
    from fed_unlearn.adapters import check_ranks

    shapes = {"m.lora_A.weight": torch.Size([2, 3]), "m.lora_B.weight": (3, 2)}
    with pytest.raises(ValueError, match=needle):
        check_ranks(ranks, shapes)
    assert check_ranks({"m.lora_B.weight": [1, 0]}, shapes) == {
        "m.lora_B.weight": [0, 1]
    }
