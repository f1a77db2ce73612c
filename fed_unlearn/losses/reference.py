"""Reference model and hidden-state taps on the *same* peft model.

Reference model [R]: open-unlearning deep-copies the initial model; MPU's code
hands the clean server model to the client (a privacy inconsistency, spec
``foul_mpu.md`` B.5). Here the reference is **the adapter as it was when the
unlearning call started** (in MPU: the received perturbed copy). It is not a
second model: the start adapter is snapshotted once and swapped in (no grad,
eval mode) for each reference forward, then the current weights are swapped back.
Do every reference forward of a step *before* the trainable forward, so no
autograd graph holds tensors that the in-place swap modifies. The swap copies
into the live LoRA parameters directly (falling back to
:func:`~fed_unlearn.models.set_adapter` when the adapter keys cannot be paired
with parameters), which is much faster than peft's state-dict round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fed_unlearn.models import get_adapter, set_adapter


class FrozenReference:
    """Callable running the model with the adapter snapshotted at creation.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model; its current adapter becomes the reference.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.state = get_adapter(model)
        self._pairs = _adapter_parameters(model, self.state)
        self._buffers = (
            [torch.empty_like(p) for p, _ in self._pairs] if self._pairs else []
        )

    def _swap_in(self) -> Callable[[], None]:
        """Load the snapshot; return the function that restores the current one."""
        if self._pairs is None:  # generic path through peft's state-dict API
            current = get_adapter(self.model)
            set_adapter(self.model, self.state)
            return lambda: set_adapter(self.model, current)
        for (param, snap), buf in zip(self._pairs, self._buffers, strict=True):
            buf.copy_(param)
            param.copy_(snap)

        def restore() -> None:
            for (param, _), buf in zip(self._pairs or [], self._buffers, strict=True):
                param.copy_(buf)

        return restore

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` with the reference adapter loaded, eval mode, no grad.

        The current adapter and the train/eval mode are restored afterwards, also
        when ``fn`` raises.

        Parameters
        ----------
        fn : Callable[[], Any]
            Closure that calls ``self.model``.

        Returns
        -------
        Any
            What ``fn`` returned.
        """
        was_training = self.model.training
        with torch.no_grad():
            restore = self._swap_in()
        try:
            with torch.no_grad():
                self.model.eval()
                return fn()
        finally:
            with torch.no_grad():
                restore()
            self.model.train(was_training)

    def __call__(self, **inputs: Any) -> Any:
        """Forward ``self.model(**inputs)`` under the reference adapter.

        Parameters
        ----------
        **inputs : Any
            Model keyword arguments (``input_ids``, ``attention_mask``, ...).

        Returns
        -------
        Any
            The model output (no autograd graph).
        """
        return self.run(lambda: self.model(**inputs))


def _adapter_parameters(
    model: torch.nn.Module, state: dict[str, torch.Tensor]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]] | None:
    """Pair each adapter key with its live parameter (``None`` if ambiguous).

    Swapping parameters in place is ~100x faster than peft's state-dict
    round trip (hundreds of LoRA tensors per reference forward).
    """
    name = getattr(model, "active_adapter", None)
    if not isinstance(name, str):
        return None
    params = {
        n.replace(f".{name}.", "."): p
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    if set(params) != set(state):
        return None
    return [(params[k], state[k].to(params[k].device)) for k in state]


def frozen_reference(model: torch.nn.Module) -> FrozenReference:
    """Snapshot the model's current adapter as a frozen reference model.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.

    Returns
    -------
    FrozenReference
        ``ref(**inputs)`` forwards under the snapshot; ``ref.run(fn)`` runs any
        closure under it.
    """
    return FrozenReference(model)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the decoder blocks of a (peft-wrapped) causal LM.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model or plain Hugging Face causal LM (Llama-style ``model.layers``,
        GPT-style ``transformer.h``).

    Returns
    -------
    torch.nn.ModuleList
        The blocks.

    Raises
    ------
    ValueError
        If no block list is found.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers")):
        obj: Any = base
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


class _StopForward(Exception):
    """Raised by :class:`LayerTap` to skip the layers after the tapped one."""


class LayerTap:
    """Capture the output hidden state of one decoder layer.

    The forward stops right after the tapped layer (later layers and the LM head
    cannot influence it), which also means their parameters get no gradient.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model or causal LM.
    layer : int
        Index of the decoder layer.
    """

    def __init__(self, model: torch.nn.Module, layer: int) -> None:
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range [0, {len(layers)})")
        self.layer = layer
        self._armed = False
        self._value: torch.Tensor | None = None
        self._handle = layers[layer].register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        if not self._armed:
            return
        self._value = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    def __call__(self, fn: Callable[[], Any]) -> torch.Tensor:
        """Run ``fn`` (a model call) up to the tapped layer; return its output.

        Parameters
        ----------
        fn : Callable[[], Any]
            Closure calling the model.

        Returns
        -------
        torch.Tensor
            ``[B, T, d]`` hidden state (with grad if ``fn`` ran with grad).
        """
        self._armed = True
        self._value = None
        try:
            fn()
        except _StopForward:
            pass
        finally:
            self._armed = False
        if self._value is None:
            raise RuntimeError(f"decoder layer {self.layer} was not reached")
        value, self._value = self._value, None
        return value

    def remove(self) -> None:
        """Remove the forward hook."""
        self._handle.remove()
