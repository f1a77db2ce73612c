"""Dual LoRA adapters for FOUL-LoRA (spec ``foul_mpu.md`` A.7(i), option A) [R].

L2U, FOUL's training stage, splits a model into a shared "causal" part K and a
client-specific part V so that unlearning can later touch V alone. The LoRA port
attaches two adapters to every target module, W = W0 + s·B_K A_K + s·B_V A_V, and
FedAvgs both. Here they are one peft LoRA of rank 2r whose ranks [0, r) are K and
[r, 2r) are V (with alpha doubled, peft's scaling alpha/rank is the single
adapter's): B A = [B_K B_V][A_K; A_V] = B_K A_K + B_V A_V, so the model is the
two-adapter model exactly, and the wire, the history and FedAvg need no change.

The disentangling regularisers (A.7's LLM analogues of L2U's L_K and L_V; L_rec
is dropped because the LM loss already makes K and V explain the text):

- K invariance: the mean hidden state at decoder layer ``layer``, computed with V
  switched off, over the batch's tokens, is pulled to the server-broadcast
  prototype p by L_K = 1 - cos(h_K, p). The server computes p itself
  (:func:`public_prototype`): the same K-only mean hidden state over the tokens
  of the public general-knowledge probes
  (:func:`fed_unlearn.data.synthetic.general_knowledge`: hand-written facts, no
  client's data) under the global adapter it sends, and broadcasts it with every
  train request. No client statistic goes into it and no client sends one back:
  whatever records the clients hold, the same global adapter gives the same p.
  (The first port had each client upload its running mean of h_K and broadcast
  their weighted mean; that vector revealed which records a client holds.)
- V variance: a VICReg-style hinge L_V = mean_j max(0, 1 - sqrt(Var_b[z_bj] + ε))
  on the V-path features z_b (per example, the mean over its tokens of A_V x at
  every adapted module of layer ``layer``), across the batch.

The training loss is NLL + λ_K·L_K + λ_V·L_V. "FOUL-LoRA" is the name: this is
our reconstruction, not the paper's vision losses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn.data.qa import PromptFn, collate, encode_qa
from fed_unlearn.data.synthetic import general_knowledge

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class DualSpec:
    """Settings of a dual-adapter FL run.

    Parameters
    ----------
    split : int
        r: ranks [0, r) of the rank-2r LoRA are K, [r, 2r) are V.
    k_weight : float
        λ_K of the K-invariance loss (>= 0).
    v_weight : float
        λ_V of the V-variance hinge (>= 0).
    layer : int
        Decoder layer whose output (K-only) and adapted inputs (V) give the
        features; -1 = the middle layer.
    """

    split: int
    k_weight: float = 0.1
    v_weight: float = 0.1
    layer: int = -1

    def __post_init__(self) -> None:
        if self.split < 1:
            raise ValueError(f"dual adapter split must be >= 1, got {self.split}")
        if self.k_weight < 0 or self.v_weight < 0:
            raise ValueError(
                "dual-k-weight and dual-v-weight must be >= 0, got "
                f"{self.k_weight} and {self.v_weight}"
            )
        if self.layer < -1:
            raise ValueError(f"dual-layer must be >= -1, got {self.layer}")


def prototype_loss(h: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """L_K = 1 - cos(h, p) between a mean hidden state and the global prototype."""
    return 1.0 - torch.nn.functional.cosine_similarity(
        h.float(), prototype.to(h.device).float(), dim=0
    )


def variance_hinge(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term: mean_j max(0, 1 - sqrt(Var_b[z_bj] + eps)).

    Parameters
    ----------
    z : torch.Tensor
        ``[batch, features]``.
    eps : float
        Numerical floor inside the square root (VICReg's 1e-4).

    Returns
    -------
    torch.Tensor
        Scalar; 0 for a batch of one (no variance to measure).
    """
    if z.shape[0] < 2:
        return z.sum() * 0.0
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return torch.relu(1.0 - std).mean()


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean over the tokens where ``mask`` is 1: ``[b, t, d] -> [b, d]``."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def v_units(state: dict[str, torch.Tensor], split: int) -> list[str]:
    """Return the V adapter as rank units ``<key>#<i>`` (A rows, B columns >= split).

    Parameters
    ----------
    state : dict[str, torch.Tensor]
        A rank-2r dual adapter.
    split : int
        r.

    Returns
    -------
    list[str]
        Units for :class:`fed_unlearn.methods.foul.method.SubNetwork`.

    Raises
    ------
    ValueError
        The adapter's rank is not 2·split (not a dual adapter of this split).
    """
    units = []
    for k, v in sorted(state.items()):
        if "lora_A" in k:
            rank = v.shape[0]
        elif "lora_B" in k:
            rank = v.shape[1]
        else:
            continue
        if rank != 2 * split:
            raise ValueError(
                f"{k} has rank {rank}; a dual adapter of split {split} has rank "
                f"{2 * split}"
            )
        units += [f"{k}#{i}" for i in range(split, 2 * split)]
    return units


class DualRegulariser:
    """The K/V regularisers of one client's local training (a context manager).

    Inside ``with``, forward hooks on every ``lora_A`` of the peft model zero the
    V ranks during the K-only pass and keep the V-path features of layer
    ``spec.layer`` during the normal pass. :meth:`__call__` is the training loop's
    extra loss: after the normal forward of a batch it returns
    λ_K·L_K + λ_V·L_V (running one more, K-only forward);
    :meth:`k_only_hidden` is that K-only pass alone (:func:`k_prototype`).

    Parameters
    ----------
    model : torch.nn.Module
        Peft model with a rank-2·split LoRA.
    spec : DualSpec
        Settings.
    prototype : torch.Tensor, optional
        The server's prototype (``None``: no L_K).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: DualSpec,
        prototype: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.prototype = prototype
        n_layers = int(_config(model).num_hidden_layers)
        self.layer = n_layers // 2 if spec.layer == -1 else spec.layer
        if not 0 <= self.layer < n_layers:
            raise ValueError(
                f"dual-layer {spec.layer} is not a layer of this model (0.."
                f"{n_layers - 1}, or -1 for the middle)"
            )
        self._k_only = False
        self._features: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._totals: dict[str, float] = {"loss_k": 0.0, "loss_v": 0.0}
        self._batches = 0

    # ----------------------------------------------------------------- hooks
    def __enter__(self) -> DualRegulariser:
        found = 0
        for name, module in self.model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if not parent.endswith("lora_A") or not isinstance(module, torch.nn.Linear):
                continue
            if module.out_features != 2 * self.spec.split:
                raise ValueError(
                    f"{name} has rank {module.out_features}; the dual adapter needs "
                    f"rank {2 * self.spec.split}"
                )
            m = _LAYER.search(name)
            at_layer = m is not None and int(m.group(1)) == self.layer
            self._handles.append(module.register_forward_hook(self._hook(at_layer)))
            found += 1
        if not found:
            raise ValueError("the model has no LoRA adapter to split into K and V")
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._features.clear()

    def _hook(self, at_layer: bool) -> Any:
        split = self.spec.split

        def hook(_module: torch.nn.Module, _inp: Any, out: torch.Tensor) -> Any:
            if self._k_only:
                mask = torch.ones(out.shape[-1], dtype=out.dtype, device=out.device)
                mask[split:] = 0.0
                return out * mask
            if at_layer:
                self._features.append(out[..., split:])
            return None

        return hook

    # ---------------------------------------------------------------- losses
    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Extra loss of a batch whose normal forward has just run."""
        mask = batch["attention_mask"]
        feats = self._features
        self._features = []
        loss = torch.zeros((), dtype=torch.float32)
        if feats and self.spec.v_weight > 0:
            z = torch.cat([masked_token_mean(f, mask) for f in feats], dim=-1)
            loss_v = variance_hinge(z)
            self._totals["loss_v"] += float(loss_v.detach())
            loss = loss + self.spec.v_weight * loss_v
        self._batches += 1
        h_sum, n_tok = self.k_only_hidden(model, batch)
        h = h_sum / max(n_tok, 1.0)
        if self.prototype is not None and self.spec.k_weight > 0:
            loss_k = prototype_loss(h, self.prototype)
            self._totals["loss_k"] += float(loss_k.detach())
            loss = loss + self.spec.k_weight * loss_k
        return loss

    def mean_losses(self) -> dict[str, float]:
        """Return ``loss_k`` and ``loss_v``, each its mean over every batch so far.

        A term that is off (λ = 0, no prototype) counts 0. Over all batches, not
        the last one: a last batch may hold a single example.
        """
        n = max(self._batches, 1)
        return {k: v / n for k, v in self._totals.items()}

    def k_only_hidden(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """Run the K-only forward of a batch (V switched off).

        Parameters
        ----------
        model : torch.nn.Module
            The peft model the hooks are on.
        batch : dict[str, torch.Tensor]
            ``input_ids`` and ``attention_mask``.

        Returns
        -------
        tuple[torch.Tensor, float]
            The sum over the batch's (unmasked) tokens of the hidden state at
            the regulariser's layer, and the number of those tokens.
        """
        mask = batch["attention_mask"]
        self._k_only = True
        try:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                output_hidden_states=True,
            )
        finally:
            self._k_only = False
        hidden = out.hidden_states[self.layer + 1]  # [0] is the embeddings
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=(0, 1)), float(m.sum())


@torch.no_grad()
def k_prototype(
    model: torch.nn.Module,
    spec: DualSpec,
    batches: Iterable[dict[str, torch.Tensor]],
) -> list[float]:
    """Return the mean K-only hidden state at ``spec.layer`` over ``batches``.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model with a rank-2·split LoRA (run in eval mode, restored after).
    spec : DualSpec
        Settings (split and layer).
    batches : Iterable[dict[str, torch.Tensor]]
        ``input_ids`` and ``attention_mask`` per batch.

    Returns
    -------
    list[float]
        The prototype (the model's hidden size).

    Raises
    ------
    ValueError
        No token in ``batches``, or a non-finite prototype.
    """
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    tokens = 0.0
    try:
        with DualRegulariser(model, spec) as reg:
            for batch in batches:
                h_sum, n_tok = reg.k_only_hidden(model, batch)
                total = h_sum.float() + (0.0 if total is None else total)
                tokens += n_tok
    finally:
        model.train(was_training)
    if total is None or tokens == 0:
        raise ValueError("no tokens to compute a dual prototype from")
    p = (total / tokens).tolist()
    if not all(math.isfinite(x) for x in p):
        raise ValueError("the dual prototype is not finite")
    return p


def public_prototype(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_fn: PromptFn,
    spec: DualSpec,
    max_length: int,
    batch_size: int = 16,
) -> list[float]:
    """Return the K-invariance target: :func:`k_prototype` of the public probes.

    The probes are every hand-written general-knowledge fact
    (:func:`~fed_unlearn.data.synthetic.general_knowledge`), prompt and answer
    as training encodes them; they are public and no client's data, so the
    prototype depends on the adapter loaded in ``model`` and nothing else.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model with the global (rank-2·split) adapter loaded.
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    spec : DualSpec
        Settings.
    max_length : int
        Token limit per probe.
    batch_size : int
        Probes per forward pass.

    Returns
    -------
    list[float]
        The prototype.
    """
    enc = [
        encode_qa(tokenizer, prompt_fn(it.question), it.answer, max_length)
        for it in general_knowledge()
    ]
    pad = int(tokenizer.pad_token_id)
    batches = (
        collate(enc[s : s + batch_size], pad) for s in range(0, len(enc), batch_size)
    )
    return k_prototype(model, spec, batches)


def _config(model: torch.nn.Module) -> Any:
    """Return the transformers config under a peft wrapper."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        cfg = model.get_base_model().config  # type: ignore[operator]
    return cfg
