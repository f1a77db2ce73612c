"""The evaluation state every metric function reads: data, model, shared caches.

:class:`EvalContext` is what a registered metric's function receives.  It holds
the four :class:`EvalSplits`, the prompt texts, a :class:`~fed_unlearn.metrics.
scoring.Scorer` for teacher-forced statistics, the greedy generations and the
metric results computed so far, all cached so that metrics reading the same
pairs share one computation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fed_unlearn.data.qa import PromptFn
from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.generation import GEN_BATCH_SIZE, greedy_generations
from fed_unlearn.metrics.registry import get_metric
from fed_unlearn.metrics.scoring import Scorer, SeqStats
from fed_unlearn.types import QAItem

SPLIT_NAMES = ("forget", "retain", "holdout", "general")


@dataclass
class EvalSplits:
    """The four evaluation splits.

    Parameters
    ----------
    forget : list[QAItem]
        Data to be forgotten (the departed client's).
    retain : list[QAItem]
        Held-in data of the remaining clients.
    holdout : list[QAItem]
        Never-trained data of the forget distribution (MIA non-members).
    general : list[QAItem]
        General-knowledge probes; ``perturbed_answers`` are the wrong options.
    """

    forget: list[QAItem] = field(default_factory=list)
    retain: list[QAItem] = field(default_factory=list)
    holdout: list[QAItem] = field(default_factory=list)
    general: list[QAItem] = field(default_factory=list)


class EvalContext:
    """Evaluation state shared by the metric functions (caches, model, data).

    Parameters
    ----------
    model : Any
        The causal LM evaluated.
    tokenizer : Any
        Its tokenizer (needs a pad or an EOS token).
    prompt_fn : PromptFn
        Question -> prompt text.
    splits : EvalSplits
        The evaluation data.
    reference : dict or None
        ``tofu_eval`` of the reference (retrained) model.
    reference_model : Any
        Reference model (same tokenizer), or None.
    batch_size : int
        Scoring batch size.
    max_new_tokens : int
        Generation length.
    max_length : int
        Maximum tokens per scored sequence.
    share_prompts : bool
        Let the scorer share prompt computations (KV cache).
    gen_batch_size : int or None
        Generation batch size (default: ``max(batch_size, GEN_BATCH_SIZE)``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_fn: PromptFn,
        splits: EvalSplits,
        reference: dict | None,
        reference_model: Any,
        batch_size: int,
        max_new_tokens: int,
        max_length: int,
        share_prompts: bool = True,
        gen_batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.gen_batch_size = gen_batch_size or max(batch_size, GEN_BATCH_SIZE)
        self.tokenizer = tokenizer
        self.prompt_fn = prompt_fn
        self.splits = splits
        self.reference = reference
        self.reference_model = reference_model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        self._prompts: dict[str, str] = {}
        self._gens: dict[tuple[str, int], str] = {}
        self._results: dict[str, dict] = {}
        self.share_prompts = share_prompts
        # Pairs whose per-position statistics (Min-K%++, EM, ES) some metric reads:
        # the forget / holdout answers.
        detail_pairs = set(self.answer_pairs("forget")) | set(
            self.answer_pairs("holdout")
        )
        self.scorer = Scorer(
            model,
            tokenizer,
            reference_model=reference_model,
            pad_id=self.pad_id,
            batch_size=batch_size,
            max_length=max_length,
            share_prompts=share_prompts,
            detail_pairs=detail_pairs,
        )

    # ------------------------------------------------------------------ data access
    def items(self, split: str) -> list[QAItem]:
        """Return the items of a split (``"forget"``, ``"retain"``, ...)."""
        return list(getattr(self.splits, split))

    def prompt(self, question: str) -> str:
        """Return the prompt text of a question (``prompt_fn``, cached)."""
        if question not in self._prompts:
            self._prompts[question] = self.prompt_fn(question)
        return self._prompts[question]

    def answer_pairs(self, split: str) -> list[tuple[str, str]]:
        """Return the (prompt, answer) pairs of a split's items."""
        return [(self.prompt(it.question), it.answer) for it in self.items(split)]

    def tr_indices(self, split: str, correct: str) -> list[int]:
        """Return the indices of items usable for the truth ratio.

        ``correct="para"`` needs a paraphrased answer and >= 1 perturbed answer;
        ``correct="para_or_answer"`` (general probes) only needs perturbed answers.
        """
        return [
            i
            for i, it in enumerate(self.items(split))
            if it.perturbed_answers
            and (correct == "para_or_answer" or it.paraphrased_answer)
        ]

    @staticmethod
    def correct_text(item: QAItem, correct: str) -> str:
        """Return the correct answer compared with the perturbed ones.

        ``"para"``: the paraphrase (TOFU forget / retain truth ratio).
        ``"para_or_answer"``: the paraphrase when the item has one, else the answer
        (general probes: our generator gives them perturbed answers shaped like
        the paraphrase, so the paraphrase is the like-for-like correct option;
        TOFU's real-authors / world-facts sets use the answer, whose shape their
        options share).
        """
        if correct == "para" or (
            correct == "para_or_answer" and item.paraphrased_answer
        ):
            return item.paraphrased_answer
        return item.answer

    def tr_pairs(self, split: str, correct: str) -> list[tuple[str, str]]:
        """Return the truth-ratio pairs: per usable item, correct then perturbed."""
        pairs = []
        for i in self.tr_indices(split, correct):
            it = self.items(split)[i]
            p = self.prompt(it.question)
            pairs.append((p, self.correct_text(it, correct)))
            pairs.extend((p, a) for a in it.perturbed_answers)
        return pairs

    # -------------------------------------------------------------------- scoring
    def score(
        self, pairs: Sequence[tuple[str, str]], which: str = "target"
    ) -> list[SeqStats]:
        """Teacher-forced statistics of (prompt, answer) pairs (cached, batched).

        ``which`` is ``"target"`` (the evaluated model) or ``"reference"``.
        """
        return self.scorer.score(pairs, which)

    # ----------------------------------------------------------------- generation
    def generations(
        self, split: str, indices: Iterable[int] | None = None
    ) -> list[str]:
        """Greedy generations for items of a split (cached, batched, left padding)."""
        items = self.items(split)
        idx = list(range(len(items)) if indices is None else indices)
        self.prefetch_generations([(split, i) for i in idx])
        return [self._gens[(split, i)] for i in idx]

    def prefetch_generations(self, keys: Sequence[tuple[str, int]]) -> None:
        """Generate (once) for ``(split, index)`` keys in as few batches as possible."""
        todo = list(dict.fromkeys(k for k in keys if k not in self._gens))
        if not todo:
            return
        texts = greedy_generations(
            self.model,
            self.tokenizer,
            [self.prompt(self.items(s)[i].question) for s, i in todo],
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            batch_size=self.gen_batch_size,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
        )
        self._gens.update(zip(todo, texts, strict=True))

    # -------------------------------------------------------------------- results
    def result(self, name: str) -> dict:
        """Compute (once) the result dict of a registered metric."""
        if name not in self._results:
            self._results[name] = get_metric(name).fn(self)
        return self._results[name]

    def reference_tr(self) -> np.ndarray:
        """Per-item ``forget_truth_ratio`` values of the reference logs."""
        ref = self.reference
        entry = ref.get("forget_truth_ratio") if isinstance(ref, dict) else None
        vbi = entry.get("value_by_index") if isinstance(entry, dict) else None
        if not vbi:
            raise P.MissingReferenceError(
                "forget_quality needs reference logs with "
                "reference['forget_truth_ratio']['value_by_index'] (the tofu_eval "
                "of the retrained model)"
            )
        return np.array(
            [v["score"] if isinstance(v, dict) else v for v in vbi.values()],
            dtype=np.float64,
        )

    def reference_auc(self) -> float:
        """Min-K% AUC of the reference logs, 0.5 when absent (privleak quirk)."""
        ref = self.reference
        entry = ref.get("mia_min_k") if isinstance(ref, dict) else None
        if isinstance(entry, dict) and entry.get("agg_value") is not None:
            return float(entry["agg_value"])
        if isinstance(entry, int | float):
            return float(entry)
        return 0.5
