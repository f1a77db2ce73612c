"""The ``tiny`` preset: public corpus, BPE tokenizer, and pre-training of a small Llama.

A small randomly initialised Llama with a byte-level BPE tokenizer trained locally,
briefly pre-trained on public text (the docstrings of the Python standard library,
which every Python installation carries) and on the general-knowledge facts, so
LoRA has a base.  Built deterministically from a :class:`TinySpec` and cached under
``<cache>/tiny-<TinySpec.key()>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fed_unlearn import numerics, seeds
from fed_unlearn.models.base import cache_root

# the name of the module these helpers came from: log records keep their name
log = logging.getLogger("fed_unlearn.models")

TINY_VERSION = 10  # bump when the tiny recipe changes (part of the cache key)


_CORPUS_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections configparser "
    "contextlib copy csv dataclasses datetime decimal difflib email enum fractions "
    "functools glob gzip hashlib heapq hmac html http inspect io ipaddress itertools "
    "json logging math mimetypes operator os pathlib pickle platform pprint queue "
    "random re sched secrets shlex shutil socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading time timeit tokenize traceback "
    "typing unittest urllib uuid warnings weakref zipfile zlib"
).split()


def public_corpus(max_chars: int = 400_000) -> list[str]:
    """Collect English text from the Python standard library's docstrings.

    Parameters
    ----------
    max_chars : int
        Stop once this many characters are collected.

    Returns
    -------
    list[str]
        Paragraphs in a deterministic order.
    """
    paras: list[str] = []
    total = 0
    for name in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - platform dependent
            continue
        objs = [mod] + [
            getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")
        ]
        for obj in objs:
            doc = inspect.getdoc(obj) if callable(obj) or obj is mod else None
            if not doc:
                continue
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if len(para) < 40 or para in paras[-50:]:
                    continue
                paras.append(para)
                total += len(para)
                if total >= max_chars:
                    return paras
    return paras


def format_corpus(
    seed: int, n_people: int = 150, fact_repeat: int = 30
) -> list[tuple[str, str]]:
    r"""Question/answer text about *other* fictitious people, for pre-training.

    Teaches the tiny model the prompt format and the shape of invented values (as
    a real LLM knows English) without any person of the experiments: the people
    are drawn from a separate seed stream (``seeds.TINY_PEOPLE + seed``). The
    general-knowledge probes are included too, as the world knowledge a real LLM
    brings.

    Parameters
    ----------
    seed : int
        Recipe seed.
    n_people : int
        Number of pre-training people.
    fact_repeat : int
        Copies of each general-knowledge fact (answer and paraphrase).

    Returns
    -------
    list[str]
        One ``Question: ...\nAnswer: ...`` text per item.
    """
    from fed_unlearn.data import generate_people
    from fed_unlearn.data.synthetic import general_knowledge

    people = generate_people(seeds.TINY_PEOPLE + seed, n_people) if n_people > 0 else []
    texts = [
        (f"Question: {it.question}\nAnswer: ", it.answer)
        for p in people
        for it in p.items
    ]
    # World knowledge a real LLM has from pre-training (the utility probes).
    facts = [
        (f"Question: {it.question}\nAnswer: ", ans)
        for it in general_knowledge()
        for ans in (it.answer, it.paraphrased_answer)
    ]
    return texts + facts * fact_repeat


@dataclass(frozen=True)
class TinySpec:
    """Recipe of the ``tiny`` preset (part of its cache key).

    Parameters
    ----------
    vocab_size : int
        BPE vocabulary size (default: 2048).
    hidden_size, intermediate_size, num_layers, num_heads : int
        Llama dimensions (defaults: 128, 256, 4, 4).
    pretrain_steps : int
        Causal-LM steps on the public corpus (default: 800).
    fact_steps : int
        Extra steps on the general-knowledge facts only (default: 150).
    fact_repeat : int
        Copies of each general-knowledge fact in the pre-training mix (default:
        30). With 400 steps and 5 copies the facts were learnt (greedy answers
        right) but shallowly: LoRA FL on the fictitious people overwrote every
        one of them, and ``model_utility`` (whose harmonic mean includes
        ``gk_Q_A_ROUGE``) was 0 for every tuned tiny model.
    seq_len, batch_size : int
        Pre-training sequence length and batch size (defaults: 64, 16).
    lr : float
        Pre-training AdamW learning rate (default: 3e-3).
    seed : int
        Seed of tokenizer-independent randomness (default: 0).
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    pretrain_steps: int = 800
    fact_steps: int = 150
    fact_repeat: int = 30
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        """Return a short hash identifying this recipe."""
        recipe = {**self.__dict__, "v": TINY_VERSION, "py": sys.version_info[:2]}
        if tag := numerics.cache_tag():  # the native mode adds nothing: old keys stay
            recipe["numerics"] = tag
        blob = json.dumps(recipe, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_tokenizer(texts: Sequence[str], vocab_size: int) -> object:
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Parameters
    ----------
    texts : Sequence[str]
        Training text.
    vocab_size : int
        Target vocabulary size (special tokens included).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Tokenizer with ``<s>``, ``</s>`` and ``<pad>`` special tokens.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    return tok


def tiny_dir(spec: TinySpec | None = None) -> Path:
    """Build (once) and return the directory of the ``tiny`` preset.

    Parameters
    ----------
    spec : TinySpec, optional
        Recipe; the default recipe when omitted.

    Returns
    -------
    Path
        Hugging Face directory with model and tokenizer.
    """
    spec = spec or TinySpec()
    out = cache_root() / f"tiny-{spec.key()}"
    if (out / "done").is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    texts: list[str | tuple[str, str]] = [
        *public_corpus(),
        *format_corpus(spec.seed, fact_repeat=spec.fact_repeat),
    ]
    tok = build_tiny_tokenizer(
        [t if isinstance(t, str) else "".join(t) for t in texts], spec.vocab_size
    )
    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),  # type: ignore[arg-type]
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tok.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    if spec.pretrain_steps > 0:
        _pretrain(model, tok, texts, spec)
    if spec.fact_steps > 0:
        # A short "knowledge" phase: the world facts a real LLM knows (the
        # general-knowledge probes), so utility metrics have something to lose.
        facts = format_corpus(spec.seed, n_people=0)
        _pretrain(
            model,
            tok,
            facts,
            dataclasses.replace(spec, pretrain_steps=spec.fact_steps, lr=spec.lr / 3),
        )
    # a per-process scratch name: SuperNodes on one machine may build at once
    from fed_unlearn.scratch import scratch_dir

    tmp = scratch_dir(out)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)  # type: ignore[attr-defined]
    (tmp / "done").write_text(json.dumps(spec.__dict__))
    if (out / "done").is_file():  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # lost the race between the check and the rename
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "done").is_file():
            raise
    return out


def _pretrain(
    model: torch.nn.Module,
    tok: object,
    texts: Sequence[str | tuple[str, str]],
    spec: TinySpec,
) -> None:
    """Causal-LM pre-training of the tiny model on packed public text."""
    eos = tok.eos_token_id  # type: ignore[attr-defined]
    stream: list[int] = []
    for t in texts:
        for part in (t,) if isinstance(t, str) else t:
            stream.extend(tok(part, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        stream.append(eos)
    data = torch.tensor(stream, dtype=torch.long)
    n_chunks = len(data) // spec.seq_len
    chunks = data[: n_chunks * spec.seq_len].view(n_chunks, spec.seq_len)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.pretrain_steps, pct_start=0.1
    )
    model.train()
    for step in range(spec.pretrain_steps):
        idx = torch.randint(0, n_chunks, (spec.batch_size,), generator=gen)
        batch = chunks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == spec.pretrain_steps - 1:
            log.info(
                "tiny pre-training step %d/%d loss %.3f",
                step + 1,
                spec.pretrain_steps,
                loss.item(),
            )
    model.eval()
