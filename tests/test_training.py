"""Local LoRA training, adapter init and state handling on a tiny model."""

from __future__ import annotations

import pytest
import torch

from fed_unlearn.models import (
    LoraSpec,
    get_adapter,
    init_adapter,
    load_lora_model,
    prompt_formatter,
    set_adapter,
)
from fed_unlearn.training import TrainSpec, budget_batches, derive_seed, local_train


@pytest.fixture
def lora(tiny_model_dir):
    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    return model, tok, prompt_formatter(tok)


def test_init_adapter_is_seed_determined(lora):
    model, _, _ = lora
    a = init_adapter(model, 1)
    b = init_adapter(model, 1)
    c = init_adapter(model, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # peft's init: B = 0, A random
    assert all(float(v.abs().sum()) == 0 for k, v in a.items() if "lora_B" in k)
    assert all(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_A" in k)


def test_local_training_moves_only_the_adapter_and_lowers_the_loss(lora, items):
    model, tok, pf = lora
    set_adapter(model, init_adapter(model, 0))
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n
    }
    spec = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=64)
    first = local_train(model, tok, pf, items, spec, seed=0)
    for _ in range(4):
        last = local_train(model, tok, pf, items, spec, seed=1)
    after = get_adapter(model)
    assert all(
        float(v.abs().sum()) > 0 for k, v in after.items() if "lora_B" in k
    )  # open-unlearning #178
    assert all(
        torch.equal(p, base_before[n])
        for n, p in model.named_parameters()
        if "lora_" not in n
    )
    assert last.loss < first.loss
    assert first.steps == -(-len(items) // 4) and first.tokens > 0


def test_local_training_is_deterministic_for_a_seed(lora, items):
    model, tok, pf = lora
    spec = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=64)
    outs = []
    for seed in (5, 5, 6):
        set_adapter(model, init_adapter(model, 0))
        local_train(model, tok, pf, items, spec, seed=seed)
        outs.append(get_adapter(model))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_set_adapter_rejects_foreign_keys(lora):
    model, _, _ = lora
    state = get_adapter(model)
    state["unexpected.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        set_adapter(model, state)


def test_derive_seed_is_stable_and_distinguishes_parts():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, 1, 2), derive_seed(0, 2, 1), derive_seed(1, 1, 2)}) == 3
    assert 0 <= derive_seed(123) < 2**63


def test_train_spec_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainSpec(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainSpec(lr=0)


def test_max_steps_caps_local_training_mid_epoch(lora, items):
    """3 epochs of ceil(n/2) batches, capped at 3 steps: exactly 3 steps, and the
    adapter equals the one after the first 3 steps of an uncapped run."""
    model, tok, pf = lora
    start = init_adapter(model, 0)
    n_batches = -(-len(items) // 2)
    assert n_batches > 3
    spec = TrainSpec(epochs=3, batch_size=2, lr=1e-2, max_length=64, max_steps=3)
    set_adapter(model, start)
    seen: list[int] = []
    stats = local_train(model, tok, pf, items, spec, 0, lambda s, _v: seen.append(s))
    assert stats.steps == 3 and seen == [1, 2, 3]
    capped = get_adapter(model)
    set_adapter(model, start)
    full: list[dict[str, torch.Tensor]] = []
    local_train(
        model,
        tok,
        pf,
        items,
        TrainSpec(epochs=1, batch_size=2, lr=1e-2, max_length=64),
        0,
        lambda s, _v: full.append(get_adapter(model)) if s == 3 else None,
    )
    assert all(torch.allclose(capped[k], full[0][k]) for k in capped)
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        TrainSpec(max_steps=-1)


def test_budget_batches_by_hand():
    """Retraining shows a client rounds x epochs x n examples; the budget's share
    of that, split over the steps, at most the whole data per step."""
    # tiny's recipe: 1/12 of 4 x 3 x 30 = 30 examples = 2 steps of 15, 1 epoch
    assert budget_batches(1 / 12, 4, 3, 30, 2) == (15, 1)
    # SmolLM2's: 1/12 of 3 x 2 x 30 = 15 examples = 2 steps of ceil(7.5) = 8
    assert budget_batches(1 / 12, 3, 2, 30, 2) == (8, 1)
    # 60 examples of 30 items in 2 steps: two full-batch steps, two epochs
    assert budget_batches(1 / 6, 4, 3, 30, 2) == (30, 2)
    # 5 examples in 3 steps: batches of 2, 5 batches per epoch, 1 epoch
    assert budget_batches(0.5, 1, 1, 10, 3) == (2, 1)
    # 7 examples, 3 steps of 3 items out of 4: 2 batches per epoch, 2 epochs
    assert budget_batches(7 / 12, 3, 1, 4, 3) == (3, 2)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget must be a finite number > 0"):
            budget_batches(bad, 4, 3, 30, 2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        budget_batches(0.1, 4, 3, 30, 0)
    with pytest.raises(ValueError, match="n_items must be >= 1"):
        budget_batches(0.1, 4, 3, 0, 2)


@pytest.mark.parametrize("budget, passes", [(1 / 4, 1), (1 / 2, 2)])
def test_budgeted_training_sees_its_share_of_the_data(lora, items, budget, passes):
    """A 2-step run budgeted at 1/4 (1/2) of 2 rounds x 2 epochs of the items
    sees every item once (twice): its token count is that many times the sum of
    the items' encoded lengths, whatever the data order."""
    from fed_unlearn.data.qa import encode_qa

    model, tok, pf = lora
    set_adapter(model, init_adapter(model, 0))
    n = len(items)
    batch, epochs = budget_batches(budget, 2, 2, n, 2)
    spec = TrainSpec(
        epochs=epochs, batch_size=batch, lr=1e-3, max_length=64, max_steps=2
    )
    stats = local_train(model, tok, pf, items, spec, seed=3)
    lengths = [len(encode_qa(tok, pf(it.question), it.answer, 64)[0]) for it in items]
    assert stats.steps == 2
    assert stats.tokens == passes * sum(lengths)


def test_only_ranks_trains_just_the_selected_rows_of_a_and_columns_of_b(lora, items):
    """Under the client's rank masks, AdamW moves row 1 of one lora_A and column
    0 of one lora_B and leaves every other entry of the adapter exactly alone."""
    from clients.unlearn import only_ranks, only_trainable

    model, tok, pf = lora
    g = torch.Generator().manual_seed(5)
    start = {
        k: 0.1 * torch.randn(v.shape, generator=g)
        for k, v in get_adapter(model).items()
    }
    a = next(k for k in sorted(start) if "lora_A" in k)
    b = a.replace("lora_A", "lora_B")
    ranks = {a: [1], b: [0]}
    set_adapter(model, start)
    spec = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=64, max_steps=3)
    with only_trainable(model, {a, b}), only_ranks(model, ranks):
        local_train(model, tok, pf, items, spec, seed=0)
    after = get_adapter(model)
    for k in start:
        if k not in ranks:
            assert torch.equal(after[k], start[k]), k
    moved_a = (after[a] != start[a]).any(dim=1)
    moved_b = (after[b] != start[b]).any(dim=0)
    assert moved_a.tolist() == [i == 1 for i in range(start[a].shape[0])]
    assert moved_b.tolist() == [i == 0 for i in range(start[b].shape[1])]
    # the hooks are gone afterwards: a plain step moves the other rows too
    with only_trainable(model, {a}):
        local_train(model, tok, pf, items, spec, seed=0)
    assert (get_adapter(model)[a] != after[a]).any(dim=1).all()
