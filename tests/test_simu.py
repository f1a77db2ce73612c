"""SIMU: integrated gradients, SophiaG, the neuron mask and the attribution wire.

Golden values come from closed forms, finite differences or hand arithmetic,
never from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict
from helpers import LinearClients

from fed_unlearn.attribution import (
    answer_positions,
    critical_neurons,
    dual_neurons,
    integrated_gradients,
    mlp_down_projections,
    neuron_scores,
    sum_scores,
)
from fed_unlearn.losses.functional import IGNORE_INDEX
from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.methods.simu import build_mask, mlp_layout
from fed_unlearn.optim import MaskedOptimizer, SophiaG, entry_grad_masks
from fed_unlearn.protocol import (
    AttributionReply,
    AttributionRequest,
    LocalUpdateRequest,
    ProtocolError,
)


# ------------------------------------------------------------- integrated gradients
class _Quadratic(torch.nn.Module):
    """L = ½ Σ_{b,t} ‖D h_{b,t}‖², with ``down_proj`` = D (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.down_proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.down_proj.weight.copy_(weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(h)


@pytest.mark.parametrize(("m", "per_pass"), [(1, 1), (4, 1), (20, 1), (20, 3)])
def test_integrated_gradients_of_a_quadratic_match_the_closed_form(m, per_pass):
    """With ∂L/∂a = DᵀD·(α h) at a scaled position, the right Riemann sum is
    Att_k = Σ_{scaled (b,t)} h_k (DᵀD h)_k · (1/m) Σ_j j/m
          = Σ h_k (DᵀD h)_k · (m+1)/(2m);
    unscaled positions contribute nothing."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64)
    model = _Quadratic(weight).double()
    h = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    pos = torch.tensor([[True, False, True, True], [False, True, False, False]])
    batch = {"h": h, "pos": pos}
    got = integrated_gradients(
        model,
        [model.down_proj],
        [batch],
        steps=m,
        loss_fn=lambda mod, b: 0.5 * (mod(b["h"]) ** 2).sum(),
        positions_fn=lambda b: b["pos"],
        steps_per_pass=per_pass,
        stats=(stats := {}),
    )
    assert stats["passes"] == -(-m // per_pass)
    gram = weight.T @ weight
    want = torch.zeros(5, dtype=torch.float64)
    for b in range(2):
        for t in range(4):
            if pos[b, t]:
                want += h[b, t] * (gram @ h[b, t])
    want *= (m + 1) / (2 * m)
    assert len(got) == 1
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-6)


def _float64_answer_nll(model, batch):
    """Σ answer-token −log p, in float64 (an independent implementation)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * keep).sum()


def _qa_batch(tok, items, max_length=48):
    from fed_unlearn.data.qa import collate
    from fed_unlearn.models import prompt_formatter
    from fed_unlearn.training import encode_items

    enc = encode_items(tok, prompt_formatter(tok), items, max_length)
    return collate(enc, int(tok.pad_token_id))


def test_integrated_gradients_on_a_llama_match_finite_differences(
    tiny_model_dir, tiny_tokenizer, items
):
    """Per neuron k of layer l: Att_k = (1/m) Σ_j d/dε L(α_j h + ε e_k⊙h⊙pos),
    the derivative taken by central differences of forward passes only (ε =
    1e-3: Llama's RMSNorm computes in float32 even in a float64 model, so a
    smaller ε drowns in rounding)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    batch = _qa_batch(tiny_tokenizer, items[:3])
    pos = answer_positions(batch)
    m = 3
    downs = mlp_down_projections(model)
    got = integrated_gradients(
        model, downs, [batch], steps=m, loss_fn=_float64_answer_nll
    )
    assert [g.shape for g in got] == [torch.Size([64])] * 2
    eps = 1e-3

    def loss_at(layer, alpha, k, e):
        def hook(_mod, args):
            h = args[0]
            p = pos[..., None]
            scale = torch.where(p, alpha, 1.0).to(h.dtype)
            bump = torch.zeros_like(h)
            bump[..., k] = 1.0
            return (h * scale + e * bump * h * p,)

        handle = downs[layer].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return float(_float64_answer_nll(model, batch))
        finally:
            handle.remove()

    for layer in (0, 1):
        for k in (0, 17, 63):
            fd = (
                sum(
                    (loss_at(layer, j / m, k, eps) - loss_at(layer, j / m, k, -eps))
                    / (2 * eps)
                    for j in range(1, m + 1)
                )
                / m
            )
            assert got[layer][k].item() == pytest.approx(fd, rel=5e-3, abs=2e-5)
    # neuron_scores is the attribution of the log-likelihood: minus Att
    model.float()
    scores = neuron_scores(model, [batch], steps=m)  # all 3 steps in one pass
    ref = integrated_gradients(model, downs, [batch], steps=m)
    for s, r in zip(scores, ref, strict=True):
        torch.testing.assert_close(s, -r, rtol=1e-4, atol=1e-6)


def test_answer_positions_are_those_predicting_an_answer_token():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    got = answer_positions({"labels": labels})
    assert got.tolist() == [[False, True, True, False, False]]


def test_critical_and_dual_neurons_by_hand():
    forget = [torch.tensor([3.0, 1.0, 0.2, -1.0]), torch.tensor([-1.0, -2.0, 0, 0])]
    retain = [torch.tensor([0.1, 5.0, 0.0, 0.0]), torch.tensor([1.0, 0, 0, 0])]
    # t = 0.3: layer 0 keeps >= 0.9 (neurons 0, 1); layer 1's max is 0: none
    crit_f = critical_neurons(forget, 0.3)
    assert [c.tolist() for c in crit_f] == [
        [True, True, False, False],
        [False] * 4,
    ]
    crit_r = critical_neurons(retain, 0.3)  # >= 1.5 and >= 0.3
    assert [c.tolist() for c in crit_r] == [
        [False, True, False, False],
        [True, False, False, False],
    ]
    duals = dual_neurons(crit_f, crit_r)
    assert [d.tolist() for d in duals] == [[False, True, False, False], [False] * 4]
    with pytest.raises(ValueError, match=r"threshold t must be in \(0, 1\]"):
        critical_neurons(forget, 0.0)
    with pytest.raises(ValueError, match="layer shapes differ"):
        sum_scores([forget, forget[:1]])
    assert sum_scores([forget, retain])[0].tolist() == pytest.approx(
        [3.1, 6.0, 0.2, -1.0]
    )


# ---------------------------------------------------------------------- SophiaG
def test_sophia_three_steps_by_hand():
    """lr 0.1, β = (0.9, 0.95), ρ·bs = 0.04·100 = 4, wd 0.1 (decay 0.99/step).

    Entry 0 (θ=1), g = 2, -1, -4:
      h = 0.2, 0.24, 1.028; m = 0.2, 0.08, -0.328
      θ1 = 0.99 − 0.1·0.2/0.8 = 0.965
      θ2 = 0.965·0.99 − 0.1·0.08/0.96 = 0.95535 − 0.0083333 = 0.9470167
      θ3 = 0.9470167·0.99 + 0.1·0.328/4.112 = 0.9375465 + 0.0079767 = 0.9455232
    Entry 1 (θ=0), g = 0.1 thrice: |m|/(4h) = 5, 4.87, 4.75 -> clipped to 1:
      θ = -0.1, -0.199, -0.29701
    """
    p = torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    opt = SophiaG([p], lr=0.1, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, bs=100)
    want = [(0.965, -0.1), (0.9470166667, -0.199), (0.9455231532, -0.29701)]
    for g0, w in zip((2.0, -1.0, -4.0), want, strict=True):
        p.grad = torch.tensor([g0, 0.1], dtype=torch.float64)
        opt.step()
        assert p.detach().tolist() == pytest.approx(list(w), abs=1e-9)
    state = opt.state[p]
    assert state["hessian"][0].item() == pytest.approx(1.028)
    assert state["exp_avg"][0].item() == pytest.approx(-0.328)


def test_sophia_refuses_bad_hyper_parameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="betas"):
        SophiaG(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="rho and bs"):
        SophiaG(p, rho=0.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        get_method("simu", {"optimizer": "sgd"})


# ------------------------------------------------------------------ the mask
def _mlp_adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two layers: q_proj and gate/up/down LoRA factors (d=3, d_ff=4, r=2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in (0, 1):
        pre = f"base_model.model.model.layers.{layer}"
        shapes = {
            "self_attn.q_proj.lora_A.weight": (2, 3),
            "self_attn.q_proj.lora_B.weight": (3, 2),
            "mlp.gate_proj.lora_A.weight": (2, 3),
            "mlp.gate_proj.lora_B.weight": (4, 2),
            "mlp.up_proj.lora_A.weight": (2, 3),
            "mlp.up_proj.lora_B.weight": (4, 2),
            "mlp.down_proj.lora_A.weight": (2, 4),
            "mlp.down_proj.lora_B.weight": (3, 2),
        }
        for name, shape in shapes.items():
            out[f"{pre}.{name}"] = torch.randn(*shape, generator=g)
    return out


def test_simu_changes_only_the_masked_entries_and_attention():
    """LinearClients moves every entry it receives; SIMU's server keeps every
    entry outside the mask bit-identical. Client 1 (departed) scores neuron 1
    highest in both layers, client 0's scores are never positive: the mask is
    neuron 1 of each layer and there are no duals."""
    trained = _mlp_adapter()
    clients = LinearClients({c: _mlp_adapter(10 + c) for c in (0, 1)})
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        clients=clients,
        departed_cooperates=True,
    )
    result = get_method("simu", {"rounds": 2}).unlearn(ctx)
    out = result.adapter
    # stage 1: one attribution request to every client, before any update
    first = clients.requests[0]
    assert set(first) == {0, 1}
    assert all(isinstance(r, AttributionRequest) for r in first.values())
    update = clients.requests[1][1]
    assert isinstance(update, LocalUpdateRequest) and update.optimizer == "sophia"
    sliced = {k for k, (_, s) in mlp_layout(trained).items() if s}
    assert update.neurons == dict.fromkeys(sorted(sliced), [1])
    assert update.loss == "gd"
    for key, value in trained.items():
        new = out[key]
        if "self_attn" in key:
            assert not torch.equal(new, value), key
        elif key in sliced:
            axis = 0 if "lora_B" in key else 1
            keep = [0, 2, 3]
            assert torch.equal(
                new.index_select(axis, torch.tensor(keep)),
                value.index_select(axis, torch.tensor(keep)),
            ), key
            assert not torch.equal(
                new.index_select(axis, torch.tensor([1])),
                value.index_select(axis, torch.tensor([1])),
            ), key
        else:  # gate/up lora_A, down lora_B: shared by all neurons, frozen
            assert torch.equal(new, value), key
            assert key in update.base and key not in update.copies[0]
    assert result.info["selected_per_layer"] == [1, 1]
    assert result.info["duals_per_layer"] == [0, 0]
    # the baselines train every tensor and skip stage 1
    clients.requests.clear()
    get_method("simu", {"mask": False, "optimizer": "adamw", "rounds": 1}).unlearn(ctx)
    (only,) = clients.requests
    assert set(only[1].copies[0]) == set(trained) and not only[1].neurons


def test_build_mask_excludes_duals_on_request():
    theta = _mlp_adapter()
    forget = [torch.tensor([3.0, 1.0, 0.2, -1.0])] * 2
    retain = [torch.tensor([0.1, 5.0, 0.0, 0.0])] * 2
    with_duals = build_mask(theta, forget, retain, 0.3, exclude_duals=False)
    without = build_mask(theta, forget, retain, 0.3, exclude_duals=True)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert with_duals.neurons[key] == [0, 1]
    assert without.neurons[key] == [0]
    assert without.masks[key].tolist() == [[True, False, False, False]] * 2
    with pytest.raises(ValueError, match="has 4 neurons, the scores of layer 0 3"):
        build_mask(theta, [torch.ones(3)] * 2, None, 0.3, False)


def test_masked_sophia_on_a_llama_keeps_other_entries_bit_identical(
    tiny_model_dir, items
):
    """The client's path: gradient masks + MaskedOptimizer around SophiaG with
    weight decay (which alone would move every entry) on a peft model."""
    from clients.unlearn import neuron_masks, only_trainable
    from fed_unlearn.losses import unlearn_train
    from fed_unlearn.models import (
        LoraSpec,
        get_adapter,
        init_adapter,
        load_lora_model,
        prompt_formatter,
        set_adapter,
    )
    from fed_unlearn.optim import make_optimizer
    from fed_unlearn.training import TrainSpec

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    start = init_adapter(model, 0)
    # B starts at zero in peft: give every factor a value so decay would show
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    set_adapter(model, start)
    layout = mlp_layout(start)
    sliced = sorted(k for k, (_, s) in layout.items() if s)
    frozen = {k for k, (_, s) in layout.items() if not s}
    neurons = dict.fromkeys(sliced, [2, 5, 40])
    masks = neuron_masks(model, neurons)
    assert len(masks) == len(sliced) == 6
    with only_trainable(model, set(start) - frozen), entry_grad_masks(masks):
        unlearn_train(
            model,
            tok,
            prompt_formatter(tok),
            items,
            "ga",
            TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_steps=3),
            seed=0,
            optimizer=lambda ps: MaskedOptimizer(
                make_optimizer("sophia", ps, 1e-2, weight_decay=0.5), masks
            ),
        )
    after = get_adapter(model)
    for key in start:
        if key in frozen:
            assert torch.equal(after[key], start[key]), key
        elif key in neurons:
            axis = 0 if "lora_B" in key else 1
            rest = torch.tensor([i for i in range(64) if i not in (2, 5, 40)])
            pick = torch.tensor([2, 5, 40])
            assert torch.equal(
                after[key].index_select(axis, rest), start[key].index_select(axis, rest)
            ), key
            assert not torch.equal(
                after[key].index_select(axis, pick), start[key].index_select(axis, pick)
            ), key
        else:
            assert not torch.equal(after[key], start[key]), key


# ------------------------------------------------------------------ the wire
def test_attribution_reply_carries_one_summed_vector_per_layer(
    tiny_model_dir, monkeypatch
):
    """The client handler returns ``scores.<l>`` vectors equal to the sum of the
    per-item scores (so no per-item value is sent), only scalar metrics, and
    refuses below its privacy floor before touching the model."""
    import clients.unlearn as unlearn
    from fed_unlearn.config import RunConfig
    from fed_unlearn.models import LoraSpec, init_adapter, load_lora_model
    from fed_unlearn.privacy import PolicyError

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    from fed_unlearn.models import prompt_formatter

    monkeypatch.setattr(
        unlearn, "client_model", lambda cfg: (model, tok, prompt_formatter(tok))
    )
    cfg = RunConfig(
        preset="tiny", num_clients=2, people_per_client=1, qa_per_person=10
    ).resolved()
    adapter = init_adapter(model, 0)
    req = AttributionRequest(adapter, steps=2, batch_size=4)
    node = {"partition-id": 0, "num-partitions": 2}
    ctx = Context(
        run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}
    )
    reply = unlearn.neuron_attribution(req, ctx, cfg)
    fields, arrays = reply.to_fields()
    assert sorted(arrays) == ["scores.0", "scores.1"]
    assert all(v.shape == (64,) for v in arrays.values())
    assert set(fields) == {"client-id", "num-examples", "passes", "attribution-seconds"}
    assert (
        fields["num-examples"] == 10 and fields["passes"] == 2 * 3
    )  # layers x batches, both steps in one pass
    # the sum over items, item by item
    items = unlearn.client_items(cfg, node)
    per_item = [neuron_scores(model, [_qa_batch(tok, [it], 64)], 2) for it in items]
    for layer in (0, 1):
        want = torch.stack([p[layer] for p in per_item]).sum(0)
        torch.testing.assert_close(reply.scores[layer], want, rtol=1e-4, atol=1e-5)
    strict = Context(
        run_id=1,
        node_id=1,
        node_config={**node, "min-examples": 11},
        state=RecordDict(),
        run_config={},
    )
    monkeypatch.setattr(unlearn, "client_model", lambda cfg: pytest.fail("model"))
    with pytest.raises(PolicyError, match="neuron attribution.*rest on 10"):
        unlearn.neuron_attribution(req, strict, cfg)


def test_attribution_messages_round_trip_and_refuse_what_does_not_fit():
    scores = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])]
    reply = AttributionReply(
        scores, client_id=1, num_examples=9, passes=4, attribution_seconds=0.1
    )
    fields, arrays = reply.to_fields()
    back = AttributionReply.from_fields(fields, arrays)
    assert all(torch.equal(a, b) for a, b in zip(back.scores, scores, strict=True))
    req = AttributionRequest({"m.lora_A.weight": torch.zeros(1, 2)}, steps=5)
    f, a = req.to_fields()
    assert f == {"kind": "attribution", "steps": 5}
    assert AttributionRequest.from_fields(f, a).steps == 5
    with pytest.raises(ProtocolError, match="'steps' and 'batch-size' must be >= 1"):
        AttributionRequest({"w": torch.zeros(1)}, steps=0)
    with pytest.raises(ProtocolError, match="unexpected array 'item.0'"):
        AttributionReply.from_fields(fields, {"item.0": torch.zeros(2)})
    with pytest.raises(ProtocolError, match="layer indices"):
        AttributionReply.from_fields(fields, {"scores.1": torch.zeros(2)})
    with pytest.raises(ProtocolError, match="finite 1-D float vector"):
        AttributionReply(
            [torch.zeros(2, 2)],
            client_id=1,
            num_examples=9,
            passes=1,
            attribution_seconds=0.0,
        )


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_simu_runs_from_the_cli_on_tiny(tmp_path):
    """Both FL phases, the attribution query to every client, two masked SophiaG
    rounds on live Flower clients, then the evaluation."""
    import json

    from helpers import E2E_BASE, run_cli

    out = tmp_path / "simu"
    args = ["run", *E2E_BASE, "--method", "simu", "--quiet", "--out", str(out)]
    run_cli([*args, "--opt", "rounds=2", "--opt", "ig_steps=4"], tmp_path / "runs")
    run = json.loads((out / "run.json").read_text())
    info = run["unlearn_info"]
    assert info["optimizer"] == "sophia" and info["mask"] is True
    assert len(info["selected_per_layer"]) == len(info["duals_per_layer"]) > 0
    assert 0 < info["trainable_fraction"] < 1
    assert info["attribution_passes"] > 0
    curve = run["curves"]["unlearn"]
    assert len(curve) == 3
    assert curve[-1]["forget_Q_A_Prob"] < curve[0]["forget_Q_A_Prob"]
