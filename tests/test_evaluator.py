"""Tests of the TOFU-style evaluator on a tiny random Llama and a word tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fed_unlearn.metrics import (
    TOFU_METRICS,
    EvalSplits,
    MissingReferenceError,
    evaluate,
)
from fed_unlearn.types import QAItem


def prompt_fn(q: str) -> str:
    return f"Question: {q}\nAnswer: "


def _item(i: int, topic: str) -> QAItem:
    return QAItem(
        question=f"What does {topic} {i} like?",
        answer=f"{topic} {i} likes red apples and long walks",
        paraphrased_answer=f"red apples and long walks are liked by {topic} {i}",
        perturbed_answers=(
            f"{topic} {i} likes blue cars",
            f"{topic} {i} hates green tea and short naps",
        ),
        person=f"{topic} {i}",
    )


FORGET = [_item(i, "Alice") for i in range(5)]
RETAIN = [_item(i, "Bob") for i in range(4)]
HOLDOUT = [_item(i, "Carol") for i in range(4)]
GENERAL = [
    QAItem(
        "What is the capital of France?",
        "Paris.",
        "The city of Paris.",
        ("The city of Rome.", "The city of Berlin."),
    ),
    QAItem("What colour is the sky?", "blue", "", ("green",)),
    QAItem("How many legs has a cat?", "four legs", "", ("two legs", "six legs")),
    QAItem("Who wrote Hamlet?", "Shakespeare", "", ()),  # no options: skipped
]
SPLITS = EvalSplits(forget=FORGET, retain=RETAIN, holdout=HOLDOUT, general=GENERAL)
EXPECTED_DEFAULT = [
    n
    for n in TOFU_METRICS
    if n not in ("forget_quality", "mia_gradnorm", "mia_reference")
]


def _all_texts() -> list[str]:
    texts = []
    for it in FORGET + RETAIN + HOLDOUT + GENERAL:
        texts += [
            prompt_fn(it.question),
            it.answer,
            it.paraphrased_answer,
            *it.perturbed_answers,
        ]
    return texts


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny matmuls are much faster (and steadier on busy machines) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in _all_texts() for w, _ in pre.pre_tokenize_str(t)})
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


def _model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return _model(len(tokenizer))


@pytest.fixture(scope="module")
def result(model, tokenizer):
    return evaluate(model, tokenizer, prompt_fn, SPLITS, batch_size=4, max_new_tokens=8)


def _ref_avg_loss(model, tokenizer, prompt: str, answer: str) -> float:
    """Independent avg loss: one unpadded sequence, plain forward pass."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total = sum(lp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(a_ids))
    return -total / len(a_ids)


def test_output_keys_and_shapes(result):
    tofu_eval, summary = result
    assert list(summary) == EXPECTED_DEFAULT
    assert set(tofu_eval) == set(EXPECTED_DEFAULT) | {"generations"}
    for name, value in summary.items():
        assert isinstance(value, float) and math.isfinite(value), name
        assert tofu_eval[name]["agg_value"] == value
    for name in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "exact_memorization"):
        assert len(tofu_eval[name]["value_by_index"]) == len(FORGET)
    assert set(tofu_eval["forget_Q_A_ROUGE"]["value_by_index"]["0"]) >= {
        "rougeL_recall",
        "ground_truth",
        "generation",
    }
    assert len(tofu_eval["retain_Truth_Ratio"]["value_by_index"]) == len(RETAIN)
    # the general item without perturbed options is skipped (index 3)
    assert set(tofu_eval["gk_Q_A_Prob"]["value_by_index"]) == {"0", "1", "2"}
    assert set(tofu_eval["gk_Truth_Ratio"]["value_by_index"]) == {"0", "1", "2"}
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        entry = tofu_eval[name]
        assert 0.0 <= entry["agg_value"] <= 1.0
        assert len(entry["forget"]["value_by_index"]) == len(FORGET)
        assert len(entry["holdout"]["value_by_index"]) == len(HOLDOUT)
    # without reference logs privleak uses AUC_ref = 0.5
    auc = summary["mia_min_k"]
    assert summary["privleak"] == pytest.approx(((1 - auc) - 0.5) / 0.5 * 100)
    assert 0.0 <= summary["model_utility"] <= 1.0
    gens = tofu_eval["generations"]
    assert len(gens["forget"]) == 5 and len(gens["retain"]) == 4
    assert set(gens["forget"][0]) == {"question", "ground_truth", "generation"}
    assert gens["forget"][0]["question"] == FORGET[0].question


def test_model_utility_is_hmean_of_nine(result):
    _, s = result
    parts = [s["retain_Q_A_Prob"], s["retain_Q_A_ROUGE"], s["retain_Truth_Ratio"]]
    parts += [s["gk_Q_A_Prob"], s["gk_Q_A_ROUGE"], s["gk_Truth_Ratio"]] * 2
    expected = 0.0 if min(parts) == 0 else len(parts) / sum(1 / p for p in parts)
    assert s["model_utility"] == pytest.approx(expected)


def test_forget_prob_matches_plain_forward(result, model, tokenizer):
    tofu_eval, _ = result
    vbi = tofu_eval["forget_Q_A_Prob"]["value_by_index"]
    for i, it in enumerate(FORGET):
        ref = _ref_avg_loss(model, tokenizer, prompt_fn(it.question), it.answer)
        assert vbi[str(i)]["avg_loss"] == pytest.approx(ref, abs=1e-5)
        assert vbi[str(i)]["prob"] == pytest.approx(math.exp(-ref), abs=1e-5)
    mean = sum(v["prob"] for v in vbi.values()) / len(vbi)
    assert tofu_eval["forget_Q_A_Prob"]["agg_value"] == pytest.approx(mean)


def test_truth_ratio_matches_plain_forward(result, model, tokenizer):
    tofu_eval, _ = result
    it = FORGET[2]
    p = prompt_fn(it.question)
    para = _ref_avg_loss(model, tokenizer, p, it.paraphrased_answer)
    pert = [_ref_avg_loss(model, tokenizer, p, a) for a in it.perturbed_answers]
    tr = math.exp(-sum(pert) / len(pert)) / (math.exp(-para) + 1e-10)
    got = tofu_eval["forget_truth_ratio"]["value_by_index"]["2"]["score"]
    assert got == pytest.approx(tr, rel=1e-4)


def test_general_uses_paraphrase_when_present(result, model, tokenizer):
    tofu_eval, _ = result
    it0, it1 = GENERAL[0], GENERAL[1]
    # item 0 has a paraphrase (the perturbed answers share its shape): it is P_c
    p = prompt_fn(it0.question)
    c = _ref_avg_loss(model, tokenizer, p, it0.paraphrased_answer)
    w = [_ref_avg_loss(model, tokenizer, p, a) for a in it0.perturbed_answers]
    tr = math.exp(-sum(w) / len(w)) / (math.exp(-c) + 1e-10)
    norm = math.exp(-c) / (math.exp(-c) + sum(math.exp(-x) for x in w) + 1e-10)
    got = tofu_eval["gk_Truth_Ratio"]["value_by_index"]["0"]["score"]
    assert got == pytest.approx(tr, rel=1e-4)
    got = tofu_eval["gk_Q_A_Prob"]["value_by_index"]["0"]["prob"]
    assert got == pytest.approx(norm, rel=1e-4)
    # item 1 has none: the answer is P_c
    p = prompt_fn(it1.question)
    c = _ref_avg_loss(model, tokenizer, p, it1.answer)
    (w1,) = [_ref_avg_loss(model, tokenizer, p, a) for a in it1.perturbed_answers]
    got = tofu_eval["gk_Truth_Ratio"]["value_by_index"]["1"]["score"]
    assert got == pytest.approx(math.exp(-w1) / (math.exp(-c) + 1e-10), rel=1e-4)


def _flat_scores(tofu_eval):
    out = {}
    for name in ("forget_Q_A_Prob", "retain_Q_A_Prob", "gk_Q_A_Prob"):
        for k, v in tofu_eval[name]["value_by_index"].items():
            out[(name, k)] = v["prob"]
    for name in ("forget_truth_ratio", "retain_Truth_Ratio", "gk_Truth_Ratio"):
        for k, v in tofu_eval[name]["value_by_index"].items():
            out[(name, k)] = v["score"]
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        for split in ("forget", "holdout"):
            for k, v in tofu_eval[name][split]["value_by_index"].items():
                out[(name, split, k)] = v["score"]
    for name in ("exact_memorization", "extraction_strength"):
        for k, v in tofu_eval[name]["value_by_index"].items():
            out[(name, k)] = v["score"]
    return out


def test_batch_size_invariance(result, model, tokenizer):
    one, _ = evaluate(
        model, tokenizer, prompt_fn, SPLITS, batch_size=1, max_new_tokens=8
    )
    four, _ = result
    a, b = _flat_scores(one), _flat_scores(four)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for split in ("forget", "retain"):
        assert [g["generation"] for g in one["generations"][split]] == [
            g["generation"] for g in four["generations"][split]
        ]


def test_training_mode_restored_and_gradnorm(tokenizer):
    model = _model(len(tokenizer), seed=1)
    model.train()
    model.model.layers[0].eval()  # mixed modes must be restored exactly
    tofu_eval, summary = evaluate(
        model,
        tokenizer,
        prompt_fn,
        SPLITS,
        metrics=["forget_Q_A_Prob"],
        gradnorm=True,
        max_new_tokens=4,
        num_samples=2,
    )
    assert model.training and model.lm_head.training
    assert not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())
    assert set(summary) == {"forget_Q_A_Prob", "mia_gradnorm"}
    scores = tofu_eval["mia_gradnorm"]["forget"]["value_by_index"]
    assert len(scores) == len(FORGET) and all(v["score"] > 0 for v in scores.values())
    assert len(tofu_eval["generations"]["forget"]) == 2

    model.eval()
    evaluate(model, tokenizer, prompt_fn, SPLITS, metrics=["mia_loss"], num_samples=0)
    assert not any(m.training for m in model.modules())


def test_reference_logs_and_reference_model(result, model, tokenizer):
    ref_eval, ref_summary = result
    tofu_eval, summary = evaluate(
        model,
        tokenizer,
        prompt_fn,
        SPLITS,
        ref_eval,
        metrics=["forget_quality", "privleak", "mia_reference"],
        reference_model=model,
        max_new_tokens=4,
    )
    assert summary["forget_quality"] == pytest.approx(1.0)  # identical TR samples
    assert summary["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert tofu_eval["privleak"]["reference_auc"] == ref_summary["mia_min_k"]
    # same model as reference: every score is 0 -> all ties -> AUC 0.5
    assert summary["mia_reference"] == pytest.approx(0.5)
    # default metric set includes forget_quality once a reference is given
    _, s2 = evaluate(
        model,
        tokenizer,
        prompt_fn,
        SPLITS,
        {"forget_truth_ratio": ref_eval["forget_truth_ratio"]},
        max_new_tokens=2,
    )
    assert "forget_quality" in s2 and "mia_reference" not in s2
    # privleak falls back to AUC_ref = 0.5 when the reference lacks mia_min_k
    auc = s2["mia_min_k"]
    assert s2["privleak"] == pytest.approx(((1 - auc) - 0.5) / 0.5 * 100)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_wrapped_model(tokenizer):
    peft = pytest.importorskip("peft")
    base = _model(len(tokenizer), seed=2)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(base, cfg)
    wrapped.train()
    tofu_eval, summary = evaluate(
        wrapped,
        tokenizer,
        prompt_fn,
        SPLITS,
        metrics=["forget_Q_A_Prob", "forget_Q_A_ROUGE"],
        gradnorm=True,
        max_new_tokens=4,
    )
    assert wrapped.training
    assert all(p.grad is None for p in wrapped.parameters())
    # independent GradNorm scores: one unpadded forward in train mode, loss =
    # -mean log p of the answer tokens (EOS left out), score = mean over the
    # tensors that got a gradient (the LoRA ones only) of their L2 norms
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert 0 < len(trainable) < len(list(wrapped.parameters()))

    def score(it):
        p_ids = tokenizer(prompt_fn(it.question), add_special_tokens=False)
        a_ids = tokenizer(it.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids["input_ids"] + a_ids])
        lp = F.log_softmax(wrapped(input_ids=ids).logits[0].float(), -1)
        n = len(p_ids["input_ids"])
        picked = [lp[n - 1 + j, t] for j, t in enumerate(a_ids)]
        grads = torch.autograd.grad(-torch.stack(picked).mean(), trainable)
        return float(torch.stack([g.norm(2) for g in grads]).mean())

    forget = [score(it) for it in FORGET]
    holdout = [score(it) for it in HOLDOUT]
    got = tofu_eval["mia_gradnorm"]
    for split, want in (("forget", forget), ("holdout", holdout)):
        vbi = got[split]["value_by_index"]
        assert [vbi[str(i)]["score"] for i in range(len(want))] == pytest.approx(
            want, rel=1e-4
        )
    # AUC with forget = 0, holdout = 1 (higher score = non-member): the share of
    # (holdout, forget) pairs ordered that way, ties counting half
    pairs = [(h > f) + 0.5 * (h == f) for h in holdout for f in forget]
    assert summary["mia_gradnorm"] == pytest.approx(sum(pairs) / len(pairs))


# ------------------------------------------------------------------------ errors


def test_error_empty_split(model, tokenizer):
    splits = EvalSplits(forget=FORGET, retain=RETAIN, holdout=[], general=GENERAL)
    with pytest.raises(ValueError, match="holdout"):
        evaluate(model, tokenizer, prompt_fn, splits)
    with pytest.raises(ValueError, match="general"):
        evaluate(
            model,
            tokenizer,
            prompt_fn,
            EvalSplits(forget=FORGET, retain=RETAIN, holdout=HOLDOUT),
            metrics=["model_utility"],
        )
    # a metric that does not need the empty split still works
    _, s = evaluate(
        model, tokenizer, prompt_fn, splits, metrics=["forget_Q_A_Prob"], num_samples=0
    )
    assert set(s) == {"forget_Q_A_Prob"}


def test_error_tokenizer_mismatch(tokenizer):
    small = _model(len(tokenizer) - 3)
    with pytest.raises(ValueError, match=rf"{len(tokenizer) - 3}.*{len(tokenizer)}"):
        evaluate(small, tokenizer, prompt_fn, SPLITS)


def test_error_unknown_metric(model, tokenizer):
    with pytest.raises(ValueError, match="forget_Q_A_Prob"):
        evaluate(model, tokenizer, prompt_fn, SPLITS, metrics=["forget_bogus"])


def test_error_missing_reference(model, tokenizer):
    with pytest.raises(MissingReferenceError):
        evaluate(model, tokenizer, prompt_fn, SPLITS, metrics=["forget_quality"])
    with pytest.raises(MissingReferenceError):
        evaluate(model, tokenizer, prompt_fn, SPLITS, metrics=["mia_reference"])
    with pytest.raises(MissingReferenceError):
        evaluate(
            model,
            tokenizer,
            prompt_fn,
            SPLITS,
            {"mia_min_k": {"agg_value": 0.5}},
            metrics=["forget_quality"],
        )


def test_error_no_truth_ratio_items(model, tokenizer):
    bare = [QAItem(it.question, it.answer) for it in FORGET]
    splits = EvalSplits(forget=bare, retain=RETAIN, holdout=HOLDOUT, general=GENERAL)
    with pytest.raises(ValueError, match="paraphrased"):
        evaluate(model, tokenizer, prompt_fn, splits, metrics=["forget_truth_ratio"])
    # items missing a paraphrase are skipped, not fatal
    mixed = [bare[0], *FORGET[1:]]
    tofu_eval, _ = evaluate(
        model,
        tokenizer,
        prompt_fn,
        EvalSplits(forget=mixed),
        metrics=["forget_truth_ratio"],
        num_samples=0,
    )
    assert set(tofu_eval["forget_truth_ratio"]["value_by_index"]) == {
        "1",
        "2",
        "3",
        "4",
    }


def test_mia_reference_from_reference_logs(result, model, tokenizer):
    """Without a reference model the attack reads the reference's logged losses."""
    ref_eval, _ = result
    # identical model: logged reference losses equal the target's -> all ties
    _, same = evaluate(
        model, tokenizer, prompt_fn, SPLITS, ref_eval, metrics=["mia_reference"]
    )
    assert same["mia_reference"] == pytest.approx(0.5)
    # shifted reference losses: scores = target loss - logged loss, AUC by hand
    shift = {"forget": 0.3, "holdout": -0.2}
    fake = {"mia_loss": {}}
    for split, d in shift.items():
        vbi = ref_eval["mia_loss"][split]["value_by_index"]
        fake["mia_loss"][split] = {
            "value_by_index": {
                k: {"score": v["score"] + d * (int(k) + 1)} for k, v in vbi.items()
            }
        }
    tofu_eval, summary = evaluate(
        model, tokenizer, prompt_fn, SPLITS, fake, metrics=["mia_reference"]
    )
    f = [-shift["forget"] * (i + 1) for i in range(len(FORGET))]
    h = [-shift["holdout"] * (i + 1) for i in range(len(HOLDOUT))]
    # AUC with forget = 0, holdout = 1: P(holdout score > forget score), ties half
    wins = sum((y > x) + 0.5 * (y == x) for x in f for y in h)
    assert summary["mia_reference"] == pytest.approx(wins / (len(f) * len(h)), abs=1e-6)
    got = tofu_eval["mia_reference"]["forget"]["value_by_index"]["1"]["score"]
    assert got == pytest.approx(f[1], abs=1e-5)
    # logs of a different split size cannot serve as reference: clear error
    short = {"mia_loss": {s: {"value_by_index": {"0": {"score": 1.0}}} for s in shift}}
    with pytest.raises(MissingReferenceError, match="mia_loss"):
        evaluate(model, tokenizer, prompt_fn, SPLITS, short, metrics=["mia_reference"])


def test_merged_lora_is_exact_and_restores_weights(tokenizer):
    """Evaluating with the adapter folded in gives the unmerged numbers and
    leaves the base weights bit-identical."""
    from peft import LoraConfig, get_peft_model

    from fed_unlearn.metrics import merged_lora

    torch.manual_seed(3)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
    )
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    kw = {"metrics": ["forget_Q_A_Prob", "mia_min_k"], "max_new_tokens": 2}
    _, plain = evaluate(
        peft_model, tokenizer, prompt_fn, SPLITS, merge_lora=False, **kw
    )
    _, merged = evaluate(peft_model, tokenizer, prompt_fn, SPLITS, **kw)
    for k, v in plain.items():
        assert merged[k] == pytest.approx(v, rel=1e-4, abs=1e-6)
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # inside the block the base weight holds W + s B A
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.get_base_layer().weight.clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    with merged_lora(peft_model):
        torch.testing.assert_close(layer.get_base_layer().weight, w0 + delta)
    assert torch.equal(layer.get_base_layer().weight, w0)
