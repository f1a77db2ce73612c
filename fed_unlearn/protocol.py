"""The typed server-client protocol: every message kind, its fields and its reply.

This docstring is the protocol's documentation. The server encodes requests and
decodes replies in ``server/channel.py`` only; the client decodes requests and
encodes replies in ``clients/wire.py`` only. Both convert between the Flower
records and the plain dicts of this module (:meth:`to_fields` /
:meth:`from_fields`), which never imports Flower.

What crosses the wire
---------------------
Only adapter tensors (LoRA ``A``/``B`` factors, whole or as selected ranks, and
deltas of them), aggregate scalar metrics of a client (its number of items, its
local work, its mean loss, its mean attribution penalty, one audit gap, one
answer probability, one token accuracy, SIMU's neuron attribution: one score
vector per layer summed over the client's items) and configs. Never text,
tokens, items, per-example values or a list-valued statistic of a client's data
in its metrics: the one list a train message carries, the dual-adapter
prototype, goes from the server to the clients and is computed from public
probes (:func:`fed_unlearn.dual.public_prototype`). One exception, SFU's
``layer-grams``: per adapted layer a Gram matrix of the client's layer inputs
summed over the tokens of at least ``min-examples`` items, an aggregate that
still reveals which items and people a client holds (``docs/methods/sfu.md``).

Envelope
--------
A request is one Flower message (``QUERY`` for ``hello``, ``audit``,
``local-update``, ``attribution``, ``token-accuracy`` and ``layer-grams``,
``TRAIN`` for ``train``, ``EVALUATE`` for ``evaluate``) with

- ``config`` (ConfigRecord): ``kind`` and the request's scalar fields;
- ``run`` (ConfigRecord): the run config the client needs, :func:`encode_run`:
  the :data:`CLIENT_RUN_KEYS` of :class:`~fed_unlearn.config.RunConfig` (its
  data, model, LoRA and local training) and nothing else: no method key, no
  departure, no strategy or evaluation key, no server path. The client never
  builds or validates a method and never learns who departs from a message;
- ``arrays`` (ArrayRecord), where the kind carries tensors.

A reply has ``metrics`` (MetricRecord: the reply's scalar fields) and ``arrays``
where the kind returns tensors. Keys and types are checked both ways: an unknown
key, a missing one or a value of the wrong type is refused with a
:class:`ProtocolError` naming the key and the kind. The client's privacy floor
(``min-examples`` of its node config, :mod:`fed_unlearn.privacy`) is the
client's own and never travels; every handler enforces it.

Adapter copies
--------------
``local-update`` carries ``m >= 1`` adapter *copies* as arrays
``copy<k>.<tensor>`` (``k = 0..m-1``, no gaps), optionally a *base* adapter as
``base.<tensor>`` and optionally projection *bases* as ``basis.<tensor>``; its
reply returns ``copy<k>.<tensor>`` deltas. :func:`pack_copies` and
:func:`unpack_copies` are the only code that builds or parses the copy and base
keys; :class:`LocalUpdateRequest` adds and splits off the ``basis.*`` ones.

Kinds (sender: server; receiver: one client per message)
--------------------------------------------------------
``hello`` (:class:`HelloRequest` -> :class:`HelloReply`)
    Discovery. No fields, no arrays. Reply: ``client-id`` (int),
    ``num-examples`` (int), ``local-data`` (flag: the node reads its own
    ``data-path``, never the path itself; the server then draws no per-round
    curve on data of its own), ``data-version`` (int: 0, or with ``local-data``
    a keyed hash of that data under a secret the node keeps, so the server's FL
    cache can tell changed data from unchanged and learns nothing else; see
    :func:`clients.task.node_data_version`). The client loads its model before
    it answers.
``train`` (:class:`TrainRequest` -> :class:`TrainReply`)
    One FL round. Fields: ``server-round`` (int), ``dual-prototype``
    (list[float], dual-adapter runs: the K-only mean hidden state of the public
    general-knowledge probes under the global adapter, computed by the server).
    Arrays: the global adapter. Reply arrays: the locally trained adapter;
    metrics ``num-examples``, ``client-id``, ``train-loss`` (float),
    ``local-steps``, ``tokens`` (int), ``train-seconds`` (float) and, in a
    dual-adapter run, ``dual-loss-k``, ``dual-loss-v`` (float). A reply never
    carries a prototype (a ``dual-prototype`` key is refused).
``evaluate`` (:class:`EvaluateRequest` -> :class:`EvaluateReply`)
    Federated evaluation. No fields. Arrays: the adapter. Reply: ``Q_A_Prob``
    (the mean answer probability on the client's items), ``eval-seconds``
    (float), ``num-examples``, ``client-id`` (int).
``audit`` (:class:`AuditRequest` -> :class:`AuditReply`)
    The departed client's self-audit (:mod:`fed_unlearn.data.audit`). No
    fields. Arrays: the adapter. Reply: ``audit-gap`` (float: mean answer
    probability on trained minus never-trained own items), ``num-examples``.
``local-update`` (:class:`LocalUpdateRequest` -> :class:`LocalUpdateReply`)
    A local objective on each copy, from a fresh AdamW (FOUL and FedOSD
    pseudo-gradients, MPU and ``local_unlearn`` unlearning, recovery rounds).
    Fields: ``loss`` (str: ``nll`` or an inner loss of
    :mod:`fed_unlearn.losses`), ``epochs``, ``batch-size`` (int, default: the
    run's), ``max-steps`` (int, 0 = no cap), ``lr`` (float, default:
    ``lr-scale`` x the run's), ``lr-scale`` (float), ``budget`` (float, instead
    of ``epochs`` and ``batch-size``: ``max-steps`` steps that see this share of
    the examples retraining would show the client,
    :func:`~fed_unlearn.training.budget_batches`), ``ranks.<tensor>``
    (list[int]: the copies carry only these rows of ``lora_A`` / columns of
    ``lora_B`` of that tensor, the base holds it whole, only those ranks train
    and return), ``retain`` (str: ``none``, ``proxy``, ``local``),
    ``loss-params.<name>`` (float: overrides of the inner loss's parameters),
    ``seed-round`` (int: the seed stream of the client's data order),
    ``attribution-weight`` (float λ > 0: add λ·R, the Ssiuu attribution
    regulariser of :mod:`fed_unlearn.losses.attribution_reg`, to an inner
    loss; one copy only), ``attribution-variant`` (str: ``increase`` or
    ``negative``), ``attribution-exact`` (int 0/1: second-order R instead of
    the detached-gradient surrogate), ``attribution-reference`` (int 0/1: 1 =
    compute the reference attributions A^0 from this request's adapter before
    the first step and keep them in the client's state; 0 = use the kept ones;
    they never leave the client). Arrays:
    the copies, the base and the projection bases ``basis.<tensor>``
    (``ortho_lora``, :mod:`fed_unlearn.ortho`: an orthonormal ``d_out x K``
    matrix U per ``lora_B`` tensor the copies carry, the output space of the
    earlier forget requests; after every optimiser step the client re-projects
    that tensor's change onto the complement, ``dB <- (I - U U^T) dB``; a basis
    is a function of earlier adapters, never of data). Reply arrays: one
    delta (after - before) per copy, of the tensors that copy carried, in the
    copies' dtype; metrics
    ``client-id``, ``num-examples``, ``local-steps``, ``tokens`` (int),
    ``train-seconds``, ``loss`` (float) and, with the regulariser,
    ``attribution-penalty`` (float: its mean normalised R over the steps).
    With an inner loss the request also takes
    ``optimizer`` (str: ``adamw``, the default, or ``sophia``, SOUL's SophiaG,
    :mod:`fed_unlearn.optim`), ``optimizer-params.<name>`` (float: Sophia's
    ``beta1``, ``beta2``, ``rho``, ``bs``), ``weight-decay`` (float, default:
    0, as FL training) and ``neurons.<tensor>`` (list[int]: only these rows of that
    ``lora_B`` / columns of that ``lora_A``, the MLP neurons SIMU selected,
    train; the tensor's other entries come back with a zero delta, unchanged).
``attribution`` (:class:`AttributionRequest` -> :class:`AttributionReply`)
    SIMU's stage 1 (:mod:`fed_unlearn.attribution`): integrated-gradient
    scores of every MLP neuron of ``adapter`` on the client's own items (the
    departed client's are its forget set, a remaining client's its retain
    set). Fields: ``steps`` (int: m scaling steps), ``batch-size`` (int,
    default: the run's). Arrays: the adapter. Reply arrays: ``scores.<l>``,
    one ``[d_ff]`` vector per decoder layer ``l``, *summed over all the
    client's items* (never per item); metrics ``client-id``,
    ``num-examples``, ``passes`` (int: forward/backward passes),
    ``attribution-seconds`` (float).
``token-accuracy`` (:class:`TokenAccuracyRequest` -> :class:`TokenAccuracyReply`)
    A client's teacher-forced token accuracy on its own items (PGA's early
    stop). No fields. Arrays: the adapter. Reply: ``token-accuracy`` (float:
    the mean over its items of the share of answer tokens, EOS excluded, that
    greedy decoding predicts), ``num-examples`` (int).
``layer-grams`` (:class:`LayerGramRequest` -> :class:`LayerGramReply`)
    The input subspace of each adapted layer (SFU). Fields: ``max-items``
    (int: items to forward, 0 = all). Arrays: the adapter. Reply arrays: per
    adapted layer, named by its ``lora_A`` tensor, the ``d_in x d_in`` Gram
    matrix ``sum_i lambda_i x_i x_i^T`` over every non-padding token ``i`` of
    the items forwarded, ``x_i`` the token's input to that layer and
    ``lambda_i > 0`` a random scale the client draws and keeps; metrics
    ``num-examples`` (items behind the sums), ``tokens`` (int). An aggregate:
    no single token's representation travels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fed_unlearn.config import (
    METHOD_OPTION_PREFIX,
    METHOD_OPTIONS_KEY,
    AnyConfig,
    RunConfig,
)
from fed_unlearn.training import NO_CAP
from fed_unlearn.types import AdapterState

__all__ = [
    "AttributionReply",
    "TokenAccuracyRequest",
    "TokenAccuracyReply",
    "LayerGramRequest",
    "LayerGramReply",
    "AttributionRequest",
    "AuditReply",
    "AuditRequest",
    "EvaluateReply",
    "EvaluateRequest",
    "HelloReply",
    "HelloRequest",
    "LocalUpdateReply",
    "LocalUpdateRequest",
    "ProtocolError",
    "Reply",
    "Request",
    "TrainReply",
    "TrainRequest",
    "decode_reply",
    "decode_request",
    "decode_run",
    "CLIENT_RUN_KEYS",
    "encode_run",
    "pack_copies",
    "unpack_copies",
]

#: Key of a request's kind in its ``config`` fields.
KIND_KEY = "kind"
#: Array-key prefix of a ``local-update``'s base adapter.
BASE_PREFIX = "base."
#: Array-key prefix of a ``local-update``'s projection bases.
BASIS_PREFIX = "basis."
_COPY = re.compile(r"^copy(\d+)\.(.+)$")
#: A config or metric value: a scalar or a list of scalars.
Value = int | float | str | list[int] | list[float] | list[str]


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text names key and kind)."""


# ------------------------------------------------------------------ field codecs
def _wire(key: str, codec: str, **kw: Any) -> Any:
    """Declare a dataclass field travelling as ``key``.

    A dict field travels as the family ``key.<name>``. ``codec`` is ``int``,
    ``float``, ``str``, ``flag`` (a bool, travelling as the int 0 or 1: Flower
    metrics hold numbers only), ``floats`` (list[float]), ``ranks`` (dict[str,
    list[int]]) or ``params`` (dict[str, float]).
    """
    return field(metadata={"key": key, "codec": codec}, **kw)


def _type_name(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _check(where: str, key: str, codec: str, value: object) -> Any:
    """Return ``value`` as ``codec`` requires, or raise naming ``key``."""
    if codec == "int":
        if type(value) is int:
            return value
        raise ProtocolError(f"{where}: {key!r} must be an int, got {_type_name(value)}")
    if codec in ("float", "params"):
        if type(value) in (int, float):
            return float(value)  # type: ignore[arg-type]
        raise ProtocolError(
            f"{where}: {key!r} must be a number, got {_type_name(value)}"
        )
    if codec == "flag":
        if type(value) is bool or (type(value) is int and value in (0, 1)):
            return bool(value)
        raise ProtocolError(
            f"{where}: {key!r} must be a flag (0 or 1), got {_type_name(value)}"
        )
    if codec == "str":
        if type(value) is str:
            return value
        raise ProtocolError(f"{where}: {key!r} must be a str, got {_type_name(value)}")
    if codec == "floats":
        if isinstance(value, list | tuple) and all(
            type(x) in (int, float) for x in value
        ):
            return [float(x) for x in value]
        raise ProtocolError(
            f"{where}: {key!r} must be a list of numbers, got {_type_name(value)}"
        )
    if codec == "ranks":
        if (
            isinstance(value, list | tuple)
            and value
            and all(type(x) is int for x in value)
        ):
            return list(value)
        raise ProtocolError(
            f"{where}: {key!r} must be a non-empty list of ints, got "
            f"{_type_name(value)}"
        )
    raise AssertionError(f"unknown codec {codec!r}")


def _specs(cls: type) -> list[tuple[dataclasses.Field[Any], str, str]]:
    return [
        (f, f.metadata["key"], f.metadata["codec"])
        for f in dataclasses.fields(cls)
        if "key" in f.metadata
    ]


def _normalise(obj: Any, where: str) -> None:
    """Check and coerce the wire fields of a (frozen) dataclass in place."""
    for f, key, codec in _specs(type(obj)):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if codec in ("ranks", "params"):
            if not isinstance(value, Mapping):
                raise ProtocolError(f"{where}: {key!r} must be a dict")
            value = {
                str(n): _check(where, f"{key}.{n}", codec, v) for n, v in value.items()
            }
        else:
            value = _check(where, key, codec, value)
        object.__setattr__(obj, f.name, value)


def _scalars_to_fields(obj: Any) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for f, key, codec in _specs(type(obj)):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if codec in ("ranks", "params"):
            out.update({f"{key}.{n}": v for n, v in sorted(value.items())})
        elif codec == "flag":
            out[key] = int(value)
        else:
            out[key] = value
    return out


def _scalars_from_fields(
    cls: type, where: str, values: Mapping[str, Any]
) -> dict[str, Any]:
    """Keyword arguments of ``cls`` from wire fields; refuse unknown/ill-typed."""
    plain = {key: (f, codec) for f, key, codec in _specs(cls)}
    families = {
        f"{key}.": (f, codec)
        for key, (f, codec) in plain.items()
        if codec in ("ranks", "params")
    }
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in plain and plain[key][1] not in ("ranks", "params"):
            f, codec = plain[key]
            kwargs[f.name] = _check(where, key, codec, value)
            continue
        prefix = next((p for p in families if key.startswith(p) and key != p), None)
        if prefix is None:
            known = sorted(
                k + (".<name>" if c in ("ranks", "params") else "")
                for k, (_, c) in plain.items()
            )
            raise ProtocolError(
                f"{where}: unknown key {key!r} (known: {', '.join(known) or 'none'})"
            )
        f, codec = families[prefix]
        kwargs.setdefault(f.name, {})[key[len(prefix) :]] = _check(
            where, key, codec, value
        )
    for f, key, _codec in _specs(cls):
        required = f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        )
        if required and f.name not in kwargs:
            raise ProtocolError(f"{where}: missing key {key!r}")
    return kwargs


def _tensors(where: str, arrays: Mapping[str, Any]) -> AdapterState:
    out: AdapterState = {}
    for key, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(
                f"{where}: array {key!r} is not a tensor ({type(value).__name__})"
            )
        out[key] = value
    return out


def _adapter(where: str, arrays: Mapping[str, Any] | None) -> AdapterState:
    if not arrays:
        raise ProtocolError(f"{where}: carries no adapter arrays")
    return _tensors(where, arrays)


def _no_arrays(where: str, arrays: Mapping[str, Any] | None) -> None:
    if arrays:
        raise ProtocolError(
            f"{where}: carries arrays ({sorted(arrays)[:3]}) but takes none"
        )


# ----------------------------------------------------------------- copy packing
def pack_copies(
    copies: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
) -> AdapterState:
    """Flatten adapter copies (and a base) into ``copy<k>.*`` / ``base.*`` arrays.

    Parameters
    ----------
    copies : Sequence[Mapping[str, torch.Tensor]]
        The copies, ``k = 0..m-1``.
    base : Mapping[str, torch.Tensor], optional
        Base adapter (tensors the copies do not carry).

    Returns
    -------
    AdapterState
        ``copy<k>.<name>`` then ``base.<name>`` -> the same tensor objects.

    Raises
    ------
    ProtocolError
        If there are no copies.
    """
    if not copies:
        raise ProtocolError("nothing to pack: no copies")
    out = {f"copy{k}.{n}": t for k, c in enumerate(copies) for n, t in c.items()}
    out.update({f"{BASE_PREFIX}{n}": t for n, t in (base or {}).items()})
    return out


def unpack_copies(
    arrays: Mapping[str, Any], where: str = "arrays"
) -> tuple[list[AdapterState], AdapterState]:
    """Inverse of :func:`pack_copies` (keys keep their order within a copy).

    Parameters
    ----------
    arrays : Mapping[str, Any]
        ``copy<k>.<name>`` and ``base.<name>`` -> tensor.
    where : str
        What is unpacked, for error messages.

    Returns
    -------
    tuple[list[AdapterState], AdapterState]
        Copies in index order and the base (empty when absent).

    Raises
    ------
    ProtocolError
        A key of neither form, a value that is no tensor, or copy indices with
        gaps.
    """
    copies: dict[int, AdapterState] = {}
    base: AdapterState = {}
    for key, value in _tensors(where, arrays).items():
        if key.startswith(BASE_PREFIX) and len(key) > len(BASE_PREFIX):
            base[key[len(BASE_PREFIX) :]] = value
            continue
        m = _COPY.match(key)
        if m is None:
            raise ProtocolError(
                f"{where}: unexpected array {key!r} (want copy<k>.* or base.*)"
            )
        copies.setdefault(int(m[1]), {})[m[2]] = value
    if sorted(copies) != list(range(len(copies))):
        raise ProtocolError(f"{where}: copy indices {sorted(copies)} are not 0..m-1")
    return [copies[k] for k in range(len(copies))], base


# -------------------------------------------------------------------- run config
#: The run config keys a client reads (its data, model, LoRA and local training),
#: the only ones that travel (:func:`encode_run`). Everything else is the
#: server's: the method, the departure (``depart``, ``sequential``,
#: ``departed-online``), the strategy, the evaluation, the history and its keys,
#: and every server path (``out-dir``, ``federation-dir``, key files). ``x-`` keys
#: (test and fault-injection switches) travel too.
CLIENT_RUN_KEYS: frozenset[str] = frozenset(
    {
        "preset",
        "model-path",
        "data-dir",
        "seed",
        "num-clients",
        "people-per-client",
        "holdout-people",
        "qa-per-person",
        "general-probes",
        "domains",
        "audit-fraction",
        "num-server-rounds",
        "local-epochs",
        "batch-size",
        "max-length",
        "lr",
        "lora-r",
        "lora-alpha",
        "lora-dropout",
        "dual-adapter",
        "dual-k-weight",
        "dual-v-weight",
        "dual-layer",
    }
)


#: Every flat key of :class:`RunConfig` (what is not one is ``from_flat``'s error).
_RUN_FLAT_KEYS: frozenset[str] = frozenset(
    f.name.replace("_", "-")
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("method_options", "extra")
)


def _is_method_key(key: str) -> bool:
    return key in ("method", METHOD_OPTIONS_KEY) or key.startswith(METHOD_OPTION_PREFIX)


def _travels(key: str) -> bool:
    return key in CLIENT_RUN_KEYS or key.startswith("x-")


def encode_run(cfg: AnyConfig) -> dict[str, Value]:
    """Return the run config a client needs: :data:`CLIENT_RUN_KEYS` only.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        The server's run configuration.

    Returns
    -------
    dict[str, Value]
        The :data:`CLIENT_RUN_KEYS` (and ``x-`` keys) as the run was given
        (``given_flat``: preset-dependent values the run left to the preset stay
        out; the client resolves them the same way). No method key, no
        departure, no server path.
    """
    return {k: v for k, v in cfg.given_flat().items() if _travels(k)}


def decode_run(fields: Mapping[str, Any]) -> RunConfig:
    """Rebuild and validate the run config of a message (client side).

    Parameters
    ----------
    fields : Mapping[str, Any]
        The message's ``run`` record.

    Returns
    -------
    RunConfig
        The client's view of the run (``RunConfig.from_flat(..., client=True)``:
        the keys that did not travel hold their defaults, ``depart`` is empty);
        the ClientApp resolves it once per message (``clients.wire``).

    Raises
    ------
    ProtocolError
        A key that does not travel: a method key (the method runs on the
        server) or another server-only key.
    fed_unlearn.config.ConfigError
        An unknown run config key or a bad value.
    """
    sent = sorted(k for k in fields if _is_method_key(k))
    if sent:
        raise ProtocolError(
            f"run config: key {sent[0]!r} does not travel (the method runs on the "
            "server)"
        )
    server = sorted(k for k in fields if not _travels(k) and k in _RUN_FLAT_KEYS)
    if server:
        raise ProtocolError(
            f"run config: key {server[0]!r} does not travel (it is the server's; "
            f"clients get {', '.join(sorted(CLIENT_RUN_KEYS))})"
        )
    return RunConfig.from_flat(fields, client=True)


# ---------------------------------------------------------------------- requests
class _Message:
    """Shared codec of requests and replies (scalar fields + arrays)."""

    kind: ClassVar[str]
    role: ClassVar[str]

    def __post_init__(self) -> None:
        _normalise(self, self.where())

    @classmethod
    def where(cls) -> str:
        """Return ``"<kind> <request|reply>"`` for error messages."""
        return f"{cls.kind} {cls.role}"

    def arrays(self) -> AdapterState | None:
        """Return the tensors this message carries (``None``: no arrays)."""
        return None

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        _no_arrays(cls.where(), arrays)
        return {}

    def to_fields(self) -> tuple[dict[str, Value], AdapterState | None]:
        """Encode as plain fields (requests include ``kind``) and arrays.

        Returns
        -------
        tuple[dict[str, Value], AdapterState or None]
            Config (request) or metric (reply) fields, and the arrays.
        """
        fields = _scalars_to_fields(self)
        if self.role == "request":
            fields = {KIND_KEY: self.kind, **fields}
        return fields, self.arrays()

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], arrays: Mapping[str, Any] | None = None
    ) -> Any:
        """Decode from plain fields and arrays, refusing what does not fit.

        Parameters
        ----------
        fields : Mapping[str, Any]
            Config (request: with ``kind``) or metric (reply) fields.
        arrays : Mapping[str, Any], optional
            The message's arrays.

        Returns
        -------
        Request or Reply
            An instance of ``cls``.

        Raises
        ------
        ProtocolError
            A wrong kind, an unknown, missing or ill-typed key, or arrays that
            do not fit the kind; the message names the key and the kind.
        """
        values = dict(fields)
        if cls.role == "request":
            kind = values.pop(KIND_KEY, None)
            if kind != cls.kind:
                raise ProtocolError(f"{cls.where()}: 'kind' is {kind!r}")
        return cls(
            **_scalars_from_fields(cls, cls.where(), values),
            **cls._kwargs_of_arrays(arrays),
        )


@dataclass(frozen=True)
class HelloRequest(_Message):
    """``hello``: discovery (no fields)."""

    kind: ClassVar[str] = "hello"
    role: ClassVar[str] = "request"


@dataclass(frozen=True)
class _AdapterRequest(_Message):
    """A request that carries one adapter (``arrays`` = its tensors)."""

    adapter: AdapterState

    def arrays(self) -> AdapterState:
        """Return the adapter."""
        return self.adapter

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"adapter": _adapter(cls.where(), arrays)}


@dataclass(frozen=True)
class TrainRequest(_AdapterRequest):
    """``train``: one FL round on the global ``adapter``.

    Parameters
    ----------
    adapter : AdapterState
        The global adapter.
    server_round : int
        Round number (1-based; seeds the client's data order).
    dual_prototype : list[float], optional
        The K-invariance target of a dual-adapter run: the server's
        :func:`~fed_unlearn.dual.public_prototype` under ``adapter``.
    proximal_mu : float
        FedProx's μ (``strategy=fedprox``): the client adds (μ/2)·‖θ -
        ``adapter``‖² to its loss (0: plain local training).
    """

    kind: ClassVar[str] = "train"
    role: ClassVar[str] = "request"
    server_round: int = _wire("server-round", "int")
    dual_prototype: list[float] | None = _wire("dual-prototype", "floats", default=None)
    proximal_mu: float = _wire("proximal-mu", "float", default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ProtocolError(
                f"{self.where()}: 'proximal-mu' must be finite and >= 0, got "
                f"{self.proximal_mu}"
            )


@dataclass(frozen=True)
class EvaluateRequest(_AdapterRequest):
    """``evaluate``: answer probability of ``adapter`` on the client's items."""

    kind: ClassVar[str] = "evaluate"
    role: ClassVar[str] = "request"


@dataclass(frozen=True)
class AuditRequest(_AdapterRequest):
    """``audit``: the departed client's self-audit of ``adapter``."""

    kind: ClassVar[str] = "audit"
    role: ClassVar[str] = "request"


@dataclass(frozen=True)
class LocalUpdateRequest(_Message):
    """``local-update``: a local objective on each copy (module docstring).

    Parameters
    ----------
    copies : list[AdapterState]
        ``m >= 1`` adapter copies (tensors in the dtype the deltas come back in).
    base : AdapterState
        Tensors the copies do not carry (kept by the client for later requests).
    loss : str
        ``"nll"`` or an inner loss name.
    epochs, batch_size : int, optional
        Local epochs and batch size (``None``: the run's).
    max_steps : int
        Cap on local steps per copy (:data:`~fed_unlearn.training.NO_CAP` = none).
    lr : float, optional
        Learning rate (``None``: ``lr_scale`` x the run's).
    lr_scale : float
        Factor on the run's learning rate when ``lr`` is ``None``.
    budget : float, optional
        Share of retraining's examples (needs ``max_steps`` >= 1 and no
        ``batch_size``).
    ranks : dict[str, list[int]]
        Tensor -> the ranks the copies carry of it.
    retain : str
        Retain term source of an inner loss.
    loss_params : dict[str, float]
        Overrides of the inner loss's parameters.
    seed_round : int
        Seed stream of the client's data order.
    optimizer : str
        ``"adamw"`` (default) or ``"sophia"`` (inner losses only).
    optimizer_params : dict[str, float]
        Overrides of the optimiser's parameters (Sophia's).
    weight_decay : float, optional
        Decoupled weight decay (``None``: 0, as FL training).
    neurons : dict[str, list[int]]
        Tensor -> the neurons (rows of ``lora_B``, columns of ``lora_A``) that
        train; its other entries stay unchanged.
    attribution_weight : float, optional
        λ of the attribution regulariser (``None``: off).
    attribution_variant : str, optional
        Its variant (``None``: ``"increase"``).
    attribution_exact : int, optional
        1 = exact second-order R (``None``: 0, the surrogate).
    attribution_reference : int, optional
        1 = compute and keep A^0 from this request's adapter (``None``: 0).
    bases : AdapterState
        Tensor -> orthonormal basis U (``d_out x K``) of the output space its
        change must stay orthogonal to (module docstring; ``ortho_lora``).

    Raises
    ------
    ProtocolError
        No copies, an ill-typed field, a budget that cannot size batches,
        attribution fields without a valid weight, with ``nll``, with several
        copies or with a flag other than 0/1, or a basis of a tensor no copy
        carries or with the wrong number of rows.
    """

    kind: ClassVar[str] = "local-update"
    role: ClassVar[str] = "request"
    copies: list[AdapterState]
    base: AdapterState = field(default_factory=dict)
    loss: str = _wire("loss", "str", default="nll")
    epochs: int | None = _wire("epochs", "int", default=None)
    batch_size: int | None = _wire("batch-size", "int", default=None)
    max_steps: int = _wire("max-steps", "int", default=NO_CAP)
    lr: float | None = _wire("lr", "float", default=None)
    lr_scale: float = _wire("lr-scale", "float", default=1.0)
    budget: float | None = _wire("budget", "float", default=None)
    ranks: dict[str, list[int]] = _wire("ranks", "ranks", default_factory=dict)
    retain: str = _wire("retain", "str", default="none")
    loss_params: dict[str, float] = _wire("loss-params", "params", default_factory=dict)
    seed_round: int = _wire("seed-round", "int", default=0)
    optimizer: str = _wire("optimizer", "str", default="adamw")
    optimizer_params: dict[str, float] = _wire(
        "optimizer-params", "params", default_factory=dict
    )
    weight_decay: float | None = _wire("weight-decay", "float", default=None)
    neurons: dict[str, list[int]] = _wire("neurons", "ranks", default_factory=dict)
    attribution_weight: float | None = _wire(
        "attribution-weight", "float", default=None
    )
    attribution_variant: str | None = _wire("attribution-variant", "str", default=None)
    attribution_exact: int | None = _wire("attribution-exact", "int", default=None)
    attribution_reference: int | None = _wire(
        "attribution-reference", "int", default=None
    )
    bases: AdapterState = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.copies:
            raise ProtocolError(f"{self.where()}: carries no copy<k>.* arrays")
        self._check_attribution()
        for name, u in self.bases.items():
            carried = [c[name] for c in self.copies if name in c]
            if not carried:
                raise ProtocolError(
                    f"{self.where()}: 'basis.{name}' projects a tensor no copy carries"
                )
            if u.dim() != 2 or u.shape[0] != carried[0].shape[0]:
                raise ProtocolError(
                    f"{self.where()}: 'basis.{name}' has shape {tuple(u.shape)}; "
                    f"it needs {carried[0].shape[0]} rows"
                )
        if self.budget is not None and (
            self.batch_size is not None or self.max_steps < 1
        ):
            raise ProtocolError(
                f"{self.where()}: a 'budget' request sizes its own batches: it "
                "needs max-steps >= 1 and no batch-size"
            )
        for family, params in (
            ("loss-params", self.loss_params),
            ("optimizer-params", self.optimizer_params),
        ):
            for name, value in params.items():
                if not math.isfinite(value):
                    raise ProtocolError(
                        f"{self.where()}: '{family}.{name}' must be finite"
                    )

    def _check_attribution(self) -> None:
        from fed_unlearn.losses.attribution_reg import VARIANTS

        where = self.where()
        extra = {
            "attribution-variant": self.attribution_variant,
            "attribution-exact": self.attribution_exact,
            "attribution-reference": self.attribution_reference,
        }
        w = self.attribution_weight
        if w is None:
            given = sorted(k for k, v in extra.items() if v is not None)
            if given:
                raise ProtocolError(f"{where}: {given[0]!r} needs 'attribution-weight'")
            return
        if not (math.isfinite(w) and w > 0):
            raise ProtocolError(
                f"{where}: 'attribution-weight' must be finite and > 0, got {w}"
            )
        if self.loss == "nll":
            raise ProtocolError(
                f"{where}: the attribution regulariser goes with an inner "
                "unlearning loss, not 'nll'"
            )
        if len(self.copies) != 1:
            raise ProtocolError(
                f"{where}: the attribution regulariser takes one copy, got "
                f"{len(self.copies)}"
            )
        variant = self.attribution_variant
        if variant is not None and variant not in VARIANTS:
            raise ProtocolError(
                f"{where}: 'attribution-variant' must be one of {VARIANTS}, got "
                f"{variant!r}"
            )
        for key in ("attribution-exact", "attribution-reference"):
            if extra[key] not in (None, 0, 1):
                raise ProtocolError(f"{where}: {key!r} must be 0 or 1")

    def arrays(self) -> AdapterState:
        """Return copies, base and bases (``copy<k>.*``, ``base.*``, ``basis.*``)."""
        out = pack_copies(self.copies, self.base)
        out.update({f"{BASIS_PREFIX}{n}": u for n, u in self.bases.items()})
        return out

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        rest = dict(arrays or {})
        bases = {
            k[len(BASIS_PREFIX) :]: rest.pop(k)
            for k in list(rest)
            if k.startswith(BASIS_PREFIX) and len(k) > len(BASIS_PREFIX)
        }
        copies, base = unpack_copies(rest, cls.where())
        return {"copies": copies, "base": base, "bases": _tensors(cls.where(), bases)}


@dataclass(frozen=True)
class AttributionRequest(_AdapterRequest):
    """``attribution``: SIMU's neuron scores of ``adapter`` on the client's items.

    Parameters
    ----------
    adapter : AdapterState
        The adapter to attribute (the global one at the unlearning request).
    steps : int
        m >= 1 integrated-gradient scaling steps.
    batch_size : int, optional
        Examples per batch (``None``: the run's).

    Raises
    ------
    ProtocolError
        An ill-typed field, ``steps < 1`` or ``batch_size < 1``.
    """

    kind: ClassVar[str] = "attribution"
    role: ClassVar[str] = "request"
    steps: int = _wire("steps", "int", default=20)
    batch_size: int | None = _wire("batch-size", "int", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ProtocolError(
                f"{self.where()}: 'steps' and 'batch-size' must be >= 1, got "
                f"{self.steps} and {self.batch_size}"
            )


@dataclass(frozen=True)
class TokenAccuracyRequest(_AdapterRequest):
    """``token-accuracy``: the client's token accuracy of ``adapter``."""

    kind: ClassVar[str] = "token-accuracy"
    role: ClassVar[str] = "request"


@dataclass(frozen=True)
class LayerGramRequest(_AdapterRequest):
    """``layer-grams``: per adapted layer, the Gram matrix of its inputs.

    Parameters
    ----------
    adapter : AdapterState
        The adapter to forward with.
    max_items : int
        Items to forward (0 = all of the client's).
    """

    kind: ClassVar[str] = "layer-grams"
    role: ClassVar[str] = "request"
    max_items: int = _wire("max-items", "int", default=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_items < 0:
            raise ProtocolError(
                f"{self.where()}: 'max-items' must be >= 0, got {self.max_items}"
            )


Request = (
    HelloRequest
    | TrainRequest
    | EvaluateRequest
    | AuditRequest
    | LocalUpdateRequest
    | AttributionRequest
    | TokenAccuracyRequest
    | LayerGramRequest
)
#: kind -> request class.
REQUESTS: dict[str, type[Request]] = {
    c.kind: c
    for c in (
        HelloRequest,
        TrainRequest,
        EvaluateRequest,
        AuditRequest,
        LocalUpdateRequest,
        AttributionRequest,
        TokenAccuracyRequest,
        LayerGramRequest,
    )
}


def decode_request(
    fields: Mapping[str, Any], arrays: Mapping[str, Any] | None = None
) -> Request:
    """Decode a request of any kind (``fields['kind']`` chooses it).

    Parameters
    ----------
    fields : Mapping[str, Any]
        The message's ``config`` record.
    arrays : Mapping[str, Any], optional
        The message's arrays.

    Returns
    -------
    Request
        The typed request.

    Raises
    ------
    ProtocolError
        An unknown kind, or what :meth:`from_fields` refuses.
    """
    kind = fields.get(KIND_KEY)
    if kind not in REQUESTS:
        raise ProtocolError(f"unknown request kind {kind!r}; known: {sorted(REQUESTS)}")
    return REQUESTS[str(kind)].from_fields(fields, arrays)


# ----------------------------------------------------------------------- replies
@dataclass(frozen=True)
class HelloReply(_Message):
    """Reply to ``hello``: the node's client id, number of items, data source.

    ``local_data`` is whether the node reads its own ``data-path`` (node config)
    rather than its partition of the run's data set: then the server holds none
    of the clients' data and measures no per-round curve on its own.
    ``data_version`` is 0 without node-local data, else an opaque tag of that
    data (a keyed hash under the node's own secret): the FL cache's key covers
    it.
    """

    kind: ClassVar[str] = "hello"
    role: ClassVar[str] = "reply"
    client_id: int = _wire("client-id", "int")
    num_examples: int = _wire("num-examples", "int")
    local_data: bool = _wire("local-data", "flag")
    data_version: int = _wire("data-version", "int")


@dataclass(frozen=True)
class TrainReply(_Message):
    """Reply to ``train``: the trained adapter and the client's figures.

    ``dual_loss_k`` and ``dual_loss_v`` are set in dual-adapter runs only.
    """

    kind: ClassVar[str] = "train"
    role: ClassVar[str] = "reply"
    adapter: AdapterState
    num_examples: int = _wire("num-examples", "int")
    client_id: int = _wire("client-id", "int")
    train_loss: float = _wire("train-loss", "float")
    local_steps: int = _wire("local-steps", "int")
    tokens: int = _wire("tokens", "int")
    train_seconds: float = _wire("train-seconds", "float")
    dual_loss_k: float | None = _wire("dual-loss-k", "float", default=None)
    dual_loss_v: float | None = _wire("dual-loss-v", "float", default=None)

    def arrays(self) -> AdapterState:
        """Return the trained adapter."""
        return self.adapter

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"adapter": _adapter(cls.where(), arrays)}


@dataclass(frozen=True)
class EvaluateReply(_Message):
    """Reply to ``evaluate``: mean answer probability on the client's items."""

    kind: ClassVar[str] = "evaluate"
    role: ClassVar[str] = "reply"
    q_a_prob: float = _wire("Q_A_Prob", "float")
    eval_seconds: float = _wire("eval-seconds", "float")
    num_examples: int = _wire("num-examples", "int")
    client_id: int = _wire("client-id", "int")


@dataclass(frozen=True)
class AuditReply(_Message):
    """Reply to ``audit``: the answer-probability gap, trained vs held-out items."""

    kind: ClassVar[str] = "audit"
    role: ClassVar[str] = "reply"
    audit_gap: float = _wire("audit-gap", "float")
    num_examples: int = _wire("num-examples", "int")


@dataclass(frozen=True)
class LocalUpdateReply(_Message):
    """Reply to ``local-update``: one delta per copy and the client's work.

    ``deltas`` may be empty only in a reply the server rejects (no update).
    """

    kind: ClassVar[str] = "local-update"
    role: ClassVar[str] = "reply"
    deltas: list[AdapterState]
    client_id: int = _wire("client-id", "int")
    num_examples: int = _wire("num-examples", "int")
    local_steps: int = _wire("local-steps", "int")
    tokens: int = _wire("tokens", "int")
    train_seconds: float = _wire("train-seconds", "float")
    loss: float = _wire("loss", "float")
    attribution_penalty: float | None = _wire(
        "attribution-penalty", "float", default=None
    )

    def arrays(self) -> AdapterState | None:
        """Return the deltas as ``copy<k>.*`` arrays (``None`` when empty)."""
        return pack_copies(self.deltas) if self.deltas else None

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        deltas, base = unpack_copies(arrays or {}, cls.where())
        if base:
            raise ProtocolError(f"{cls.where()}: returns base.* arrays")
        return {"deltas": deltas}


#: Array-key prefix of an ``attribution`` reply's per-layer score vectors.
SCORES_PREFIX = "scores."


@dataclass(frozen=True)
class AttributionReply(_Message):
    """Reply to ``attribution``: one score vector per layer, summed over items.

    Parameters
    ----------
    scores : list[torch.Tensor]
        Per decoder layer ``l`` (array ``scores.<l>``), the ``[d_ff]`` scores
        summed over the client's items.
    client_id, num_examples : int
        The client and how many items the sums run over.
    passes : int
        Forward/backward passes the client ran.
    attribution_seconds : float
        Its wall time.

    Raises
    ------
    ProtocolError
        No layers, or a score that is not a finite 1-D float vector.
    """

    kind: ClassVar[str] = "attribution"
    role: ClassVar[str] = "reply"
    scores: list[torch.Tensor]
    client_id: int = _wire("client-id", "int")
    num_examples: int = _wire("num-examples", "int")
    passes: int = _wire("passes", "int")
    attribution_seconds: float = _wire("attribution-seconds", "float")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scores:
            raise ProtocolError(f"{self.where()}: carries no scores.<l> arrays")
        for i, s in enumerate(self.scores):
            if (
                not isinstance(s, torch.Tensor)
                or s.dim() != 1
                or not s.is_floating_point()
                or not bool(torch.isfinite(s).all())
            ):
                raise ProtocolError(
                    f"{self.where()}: 'scores.{i}' must be a finite 1-D float vector"
                )

    def arrays(self) -> AdapterState:
        """Return the scores as ``scores.<l>`` arrays."""
        return {f"{SCORES_PREFIX}{i}": s for i, s in enumerate(self.scores)}

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        found: dict[int, torch.Tensor] = {}
        for key, value in _tensors(cls.where(), arrays or {}).items():
            index = key[len(SCORES_PREFIX) :]
            if not key.startswith(SCORES_PREFIX) or not index.isdigit():
                raise ProtocolError(
                    f"{cls.where()}: unexpected array {key!r} (want scores.<l>)"
                )
            found[int(index)] = value
        if sorted(found) != list(range(len(found))):
            raise ProtocolError(
                f"{cls.where()}: layer indices {sorted(found)} are not 0..L-1"
            )
        return {"scores": [found[i] for i in range(len(found))]}


@dataclass(frozen=True)
class TokenAccuracyReply(_Message):
    """Reply to ``token-accuracy``: the mean token accuracy on the client's items."""

    kind: ClassVar[str] = "token-accuracy"
    role: ClassVar[str] = "reply"
    token_accuracy: float = _wire("token-accuracy", "float")
    num_examples: int = _wire("num-examples", "int")


@dataclass(frozen=True)
class LayerGramReply(_Message):
    """Reply to ``layer-grams``: one summed Gram matrix per adapted layer.

    ``grams`` maps each ``lora_A`` tensor name to its ``d_in x d_in`` matrix.
    """

    kind: ClassVar[str] = "layer-grams"
    role: ClassVar[str] = "reply"
    grams: AdapterState
    num_examples: int = _wire("num-examples", "int")
    tokens: int = _wire("tokens", "int")

    def arrays(self) -> AdapterState:
        """Return the Gram matrices."""
        return self.grams

    @classmethod
    def _kwargs_of_arrays(cls, arrays: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"grams": _adapter(cls.where(), arrays)}


Reply = (
    HelloReply
    | TrainReply
    | EvaluateReply
    | AuditReply
    | LocalUpdateReply
    | AttributionReply
    | TokenAccuracyReply
    | LayerGramReply
)
#: kind -> reply class.
REPLIES: dict[str, type[Reply]] = {
    c.kind: c
    for c in (
        HelloReply,
        TrainReply,
        EvaluateReply,
        AuditReply,
        LocalUpdateReply,
        AttributionReply,
        TokenAccuracyReply,
        LayerGramReply,
    )
}


def decode_reply(
    kind: str, fields: Mapping[str, Any], arrays: Mapping[str, Any] | None = None
) -> Reply:
    """Decode the reply to a request of ``kind``.

    Parameters
    ----------
    kind : str
        The request's kind.
    fields : Mapping[str, Any]
        The reply's ``metrics`` record.
    arrays : Mapping[str, Any], optional
        The reply's arrays.

    Returns
    -------
    Reply
        The typed reply.

    Raises
    ------
    ProtocolError
        An unknown kind, or what :meth:`from_fields` refuses.
    """
    if kind not in REPLIES:
        raise ProtocolError(f"unknown reply kind {kind!r}; known: {sorted(REPLIES)}")
    return REPLIES[kind].from_fields(fields, arrays)
