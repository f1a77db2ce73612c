"""Run configuration: one dataclass, flat hyphenated keys as in Flower's run config.

``RunConfig.from_flat`` accepts the same keys as ``[tool.flwr.app.config]`` in
``pyproject.toml`` (``num-server-rounds``, ``lora-r``, ...) and rejects unknown keys
with a message naming them. Preset-dependent defaults (learning rate, rounds, ...)
are :data:`PRESET` there; :meth:`RunConfig.resolved` fills them in once, where a
run starts (the CLI's ``build_config``, the ServerApp's ``main``, the ClientApp's
``decode_request``), into a frozen :class:`ResolvedConfig` that the rest of the
run reads, so a run's ``run.json`` shows every value that was used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_unlearn import numerics
from fed_unlearn.dual import DualSpec
from fed_unlearn.journal import KILL_ROUND_KEY
from fed_unlearn.models import PRESETS, SYSTEM_PROMPT, LoraSpec, model_identity
from fed_unlearn.training import TrainSpec
from fed_unlearn.values import coerce, parse_text, scalar_kind


class ConfigError(ValueError):
    """A bad configuration key or value."""


#: A preset-dependent field of :class:`RunConfig` at this value takes the preset's
#: value (:data:`PRESET_DEFAULTS`); it is those fields' default.
PRESET = None

#: How a flat config (Flower run config, TOML, ``--set``) writes :data:`PRESET`:
#: Flower run configs cannot hold ``None``. :meth:`RunConfig.from_flat` reads any
#: of ``0``, ``0.0``, ``"0"`` (and ``False``, which equals 0) as :data:`PRESET`.
PRESET_FLAT = 0

#: ``eval-max-items`` at this value: every item of a split.
ALL_ITEMS = 0

#: ``domains``, ``eval-curve-items`` and ``eval-relearn-steps`` at this value: off.
OFF = 0

#: ``eval-relearn-lr`` at this value: a fifth of the run's ``lr``
#: (:meth:`ResolvedConfig.relearn_lr`).
FIFTH_OF_LR = 0.0

#: Defaults that depend on the preset: the values of the fields that are
#: :data:`PRESET` in a RunConfig.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "num_server_rounds": 4,
        "local_epochs": 3,
        "batch_size": 4,
        "lr": 5e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 64,
        "eval_max_new_tokens": 16,
    },
    "smollm2": {
        "num_server_rounds": 3,
        "local_epochs": 2,
        "batch_size": 8,
        "lr": 2e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 96,
        "eval_max_new_tokens": 24,
    },
    "custom": {
        "num_server_rounds": 3,
        "local_epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 128,
        "eval_max_new_tokens": 32,
    },
}

#: Method options whose calibrated default depends on the base model, per
#: :meth:`RunConfig.defaults_key`: a run of that method gets them unless it sets
#: them (:meth:`RunConfig.resolved`; ``run.json`` records the resolved options).
#: A method module's own defaults are those of a pretrained base (``smollm2``,
#: and a ``custom`` model); the tiny preset's base is trained from scratch on
#: the synthetic facts, and where its calibration differs it is named here.
#: ``foul_server``'s step and recovery: the ``calibration`` suite's ``tiny-*``
#: scenarios against its ``smollm2-5c`` scenario (the module's defaults).
#: ``ortho_lora``'s per-request budget and ``simu``'s (SIMU, FO- and SO-GradDiff
#: alike): the ``tiny-10c`` scenario (the modules keep the inner-loss default of
#: 4 rounds, not calibrated on a pretrained base).
PRESET_METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "foul_server": {"server_lr": 0.5, "recovery_rounds": 1},
        "ortho_lora": {"rounds": 1},
        "simu": {"rounds": 1},
    },
}

#: The named values of run-config keys: ``(name, value, the keys, meaning)``
#: (``docs/configuration.md`` lists them).
NAMED_VALUES: tuple[tuple[str, Any, str, str], ...] = (
    ("PRESET", PRESET, "the preset-dependent keys", "the preset's value"),
    (
        "PRESET_FLAT",
        PRESET_FLAT,
        "the preset-dependent keys",
        "`PRESET`, in a flat config (Flower, TOML, `--set`), which cannot hold None",
    ),
    ("ALL_ITEMS", ALL_ITEMS, "`eval-max-items`", "every item of a split"),
    (
        "OFF",
        OFF,
        "`domains`, `eval-curve-items`, `eval-relearn-steps`, "
        "`eval-relearn-benign-rounds`",
        "off",
    ),
    ("FIFTH_OF_LR", FIFTH_OF_LR, "`eval-relearn-lr`", "a fifth of the run's `lr`"),
)

#: Where ``[tool.flwr.app.config]`` (what ``flwr run`` users get) deliberately
#: differs from the class defaults (what CLI users get): the loopback deployment
#: demo (``docs/deployment.md``) runs the tiny model on two SuperNodes, client 1
#: departs, and its results go apart from the CLI's. ``tests/test_config.py``
#: checks that every other declared key has the class default.
FLWR_RUN_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "num-clients": 2,
    "depart": "1",
    "out-dir": "runs/flwr-run",
}

#: Keys ``[tool.flwr.app.config]`` does not declare: ``flwr run`` cannot set them
#: (Flower accepts only declared keys) and a deployment gets the class default.
FLWR_RUN_UNDECLARED: tuple[str, ...] = ("departed-online", "sequential")

#: The fields of :class:`RunConfig` whose default is :data:`PRESET`.
PRESET_FIELDS: tuple[str, ...] = tuple(PRESET_DEFAULTS["tiny"])

AGGREGATIONS = ("fedavg", "product_svd")

#: Flower strategies a run can train with (``strategy`` key; ``server/strategy.py``
#: records the history under each).
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")

#: The strategies whose server step is not FedAvg of the client deltas: a server
#: optimiser turns that average into the step (FedProx changes only the clients'
#: objective, so its server step is FedAvg's).
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")

#: Strategy -> the run-config keys of its hyper-parameters. A key set away from
#: its default under a strategy that does not read it is a config error.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal-mu",),
    "fedadam": ("server-eta", "server-beta-1", "server-beta-2", "server-tau"),
    "fedyogi": ("server-eta", "server-beta-1", "server-beta-2", "server-tau"),
    "fedadagrad": ("server-eta", "server-tau"),
    "fedavgm": ("server-lr", "server-momentum"),
}

_ALL_STRATEGY_KEYS = frozenset(k for ks in STRATEGY_KEYS.values() for k in ks)

_STRATEGY_RANGES = {
    "proximal-mu": ">= 0",
    "server-tau": "> 0",
    "server-eta": "> 0",
    "server-lr": "> 0",
    "server-beta-1": "in [0, 1)",
    "server-beta-2": "in [0, 1)",
    "server-momentum": "in [0, 1)",
}

#: Bump when the training recipe changes in a way no config key shows (it is part
#: of the cache key of FL phases).
FL_RECIPE_VERSION = 2

#: Data settings that only the evaluation reads (the cap on items per split and
#: the number of general-knowledge probes): no FL phase depends on them.
EVAL_ONLY_DATA_KEYS = ("eval-max-items", "general-probes")

#: Flat keys ``method-<option>`` carry the unlearning method's options.
METHOD_OPTION_PREFIX = "method-"


#: One string of ``OPTION=VALUE`` pairs (comma-separated): method options where
#: keys cannot be added, e.g. ``flwr run . --run-config "method-options='seed=7'"``
#: (Flower accepts only the keys ``[tool.flwr.app.config]`` declares).
METHOD_OPTIONS_KEY = "method-options"


def parse_value(text: str) -> Any:
    """Parse a command-line value: int, float, ``true``/``false``, else a string.

    The same as :func:`fed_unlearn.values.parse_text`.
    """
    return parse_text(text)


def parse_method_options(text: str) -> dict[str, Any]:
    """Parse ``"kappa=0.5, rounds=3"`` into method options.

    Raises
    ------
    ConfigError
        Naming a pair that is not ``OPTION=VALUE``.
    """
    out: dict[str, Any] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise ConfigError(
                f"config key {METHOD_OPTIONS_KEY!r}: {pair!r} is not OPTION=VALUE"
            )
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def data_fingerprint(data_dir: str | Path) -> str:
    """SHA-256 of every file under ``data_dir`` (relative names and bytes).

    Parameters
    ----------
    data_dir : str or Path
        A directory of client data.

    Returns
    -------
    str
        ``"sha256:<64 hex>"``; it changes when any file is edited, added,
        removed or renamed, and not with the path used to reach the directory.

    Raises
    ------
    ConfigError
        If ``data_dir`` is not a directory.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"config key 'data-dir': {root} is not a directory")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return f"sha256:{h.hexdigest()}"


class _Clients:
    """Client ids and preset key of :class:`RunConfig` and :class:`ResolvedConfig`."""

    depart: str
    num_clients: int
    preset: str
    model_path: str

    def departed(self) -> tuple[int, ...]:
        """Parse ``depart`` into sorted client ids and check they exist.

        Returns
        -------
        tuple[int, ...]
            Departed client ids.

        Raises
        ------
        ConfigError
            See :meth:`depart_order`.
        """
        return tuple(sorted(self.depart_order()))

    def depart_order(self) -> tuple[int, ...]:
        """Parse ``depart`` into client ids in the order given (``sequential``).

        Returns
        -------
        tuple[int, ...]
            Departed client ids, as listed.

        Raises
        ------
        ConfigError
            Unparsable id, unknown client, or all clients departing.
        """
        raw = [p.strip() for p in str(self.depart).split(",") if p.strip()]
        ids = []
        for part in raw:
            try:
                ids.append(int(part))
            except ValueError:
                raise ConfigError(f"--depart: {part!r} is not a client id") from None
        unknown = [i for i in ids if not 0 <= i < self.num_clients]
        if unknown:
            raise ConfigError(
                f"--depart: client(s) {unknown} never joined; with num-clients = "
                f"{self.num_clients} the clients are 0..{self.num_clients - 1}"
            )
        if not ids:
            raise ConfigError("--depart: at least one client id is needed")
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ConfigError(f"--depart: client(s) {twice} listed more than once")
        if len(set(ids)) >= self.num_clients:
            raise ConfigError("--depart: at least one client must remain")
        return tuple(ids)

    def remaining(self) -> tuple[int, ...]:
        """Client ids that stay."""
        gone = set(self.departed())
        return tuple(i for i in range(self.num_clients) if i not in gone)

    def defaults_key(self) -> str:
        """Which preset's hyper-parameter defaults apply."""
        return "custom" if self.model_path else self.preset


def _flat(cfg: RunConfig | ResolvedConfig, skip: frozenset[str]) -> dict[str, Any]:
    """Flat hyphenated keys of ``cfg`` (``None`` values and ``skip`` dropped)."""
    out = {
        f.name.replace("_", "-"): getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in _NOT_FLAT
        and f.name not in skip
        and getattr(cfg, f.name) is not None
    }
    out.update(
        {
            key: v
            for k, v in cfg.method_options.items()
            if (key := f"{METHOD_OPTION_PREFIX}{k}") not in skip
        }
    )
    out.update(cfg.extra)
    return out


#: Fields that are no flat key of their own.
_NOT_FLAT = frozenset({"extra", "method_options", "from_preset"})


def flat_defaults() -> dict[str, Any]:
    """Return the class defaults as one flat config (as ``pyproject.toml`` writes it).

    Returns
    -------
    dict[str, Any]
        Every flat key of :class:`RunConfig` with its default, :data:`PRESET`
        written as :data:`PRESET_FLAT` (``0.0`` for a float key) and
        ``method-options`` as ``""``.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "method_options":
            out[METHOD_OPTIONS_KEY] = ""
        elif f.name not in _NOT_FLAT:
            value = f.default
            if value is PRESET:
                value = PRESET_FLAT
                if scalar_kind(f.type) == "float":
                    value = float(value)  # `lr = 0.0` in TOML
            out[f.name.replace("_", "-")] = value
    return out


def resolve(cfg: RunConfig | ResolvedConfig) -> ResolvedConfig:
    """Return ``cfg`` resolved (:meth:`RunConfig.resolved`); a resolved one as is.

    For the public entry points of a run that programs call with either form
    (``simulations.runner.simulate`` and ``run_all``); everything past them takes
    the :class:`ResolvedConfig` they made.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        A validated configuration.

    Returns
    -------
    ResolvedConfig
        The run's resolved configuration.
    """
    return cfg if isinstance(cfg, ResolvedConfig) else cfg.resolved()


@dataclass
class RunConfig(_Clients):
    """Everything that defines a run (FL phase, departure, unlearning, evaluation).

    Parameters
    ----------
    preset : str
        ``"smollm2"`` (default) or ``"tiny"``; ignored for the model when
        ``model_path`` is set (the preset still picks hyper-parameter defaults,
        ``"custom"`` values are used for a model path).
    model_path : str
        Local Hugging Face causal-LM directory (default: ``""`` = use the preset).
    data_dir : str
        Directory of ``client_<i>.jsonl`` files (default: ``""`` = synthetic data).
    seed : int
        Seed of data generation, LoRA init, data order and sampling (default: 0).
    num_clients : int
        Number of clients / SuperNodes (default: 3).
    people_per_client, holdout_people, qa_per_person, general_probes : int
        Shape of the synthetic data set (defaults: 3, 3, 10, 24).
    domains : int
        Non-IID domains of the synthetic data, ``0..num_clients``: 0 (:data:`OFF`)
        = every person drawn independently (default); ``D >= 1`` puts client ``c`` in
        domain ``c % D`` and the people of a domain (holdout people included,
        dealt round-robin) share a small pool of values per attribute (see
        :func:`fed_unlearn.data.synthetic.generate_tofu`). Ignored with
        ``data_dir``.
    audit_fraction : float
        Share of each person's items a client keeps out of FL training for its
        own self-audit, ``[0, 1)`` (default: 0; see
        :mod:`fed_unlearn.data.audit` and ``stop="self_audit"``).
    depart : str
        Comma-separated client ids that leave (default: ``"2"``).
    method : str
        Unlearning method from the registry (default: ``"foul_server"``, the
        recommended oracle-free method).
    num_server_rounds : int, optional
        FL rounds (default: :data:`PRESET`, the preset's; so are the other
        ``optional`` keys).
    fraction_train : float
        Fraction of clients sampled per round (default: 1.0).
    local_epochs, batch_size, max_length : int, optional
        Local training (defaults: preset).
    lr : float, optional
        Local AdamW learning rate (default: preset).
    lora_r, lora_alpha : int, optional
        LoRA rank and alpha (defaults: preset).
    lora_dropout : float
        LoRA dropout (default: 0.0).
    aggregation : str
        ``"fedavg"`` (factor space, default) or ``"product_svd"``.
    strategy : str
        Flower strategy of FL and of the retrain oracle (:data:`STRATEGIES`):
        ``"fedavg"`` (default), ``"fedprox"``, ``"fedadam"``, ``"fedyogi"``,
        ``"fedadagrad"`` or ``"fedavgm"``; Flower's own classes, wrapped to
        record the history (``server/strategy.py``). Needs ``aggregation``
        ``"fedavg"``.
    proximal_mu : float
        FedProx's μ: each client adds (μ/2)·‖θ - θ_global‖² over its adapter to
        its loss (default: 0.01).
    server_eta : float
        FedAdam / FedYogi / FedAdagrad's server learning rate η (default: 0.01;
        Flower's is 0.1 for FedAdam and FedAdagrad, 0.01 for FedYogi). An
        adaptive server step moves every adapter entry by up to about η per
        round, whatever the size of the clients' update, so η must be small
        against the LoRA factors' entries.
    server_beta_1, server_beta_2 : float
        FedAdam / FedYogi's moment decays β1, β2 (defaults: 0.9, 0.99, as
        Flower's).
    server_tau : float
        FedAdam / FedYogi / FedAdagrad's adaptivity τ (default: 1e-3, as Flower's).
    server_lr : float
        FedAvgM's server learning rate (default: 1.0, as Flower's).
    server_momentum : float
        FedAvgM's server momentum (default: 0.9; Flower's 0.0 is plain FedAvg).
    dual_adapter : bool
        FOUL-LoRA's dual adapters (:mod:`fed_unlearn.dual`): the LoRA has rank
        2·``lora_r`` (alpha 2·``lora_alpha``), ranks [0, r) a shared adapter K and
        [r, 2r) a client-specific adapter V, trained with the K-invariance and
        V-variance regularisers; FOUL's ``subnetwork=dual`` then unlearns V alone
        (default: False).
    dual_k_weight, dual_v_weight : float
        λ_K and λ_V of those regularisers (defaults: 0.1, 0.1).
    dual_layer : int
        Decoder layer of their features; -1 = the middle one (default: -1).
    history_dtype : str
        ``"float32"`` (default) or ``"float16"`` for the history store.
    history_key_file : str
        File holding the 32-byte key (64 hex characters) that encrypts the
        history at rest with AES-256-GCM; empty = ``$FED_UNLEARN_HISTORY_KEY``
        if set, else no encryption (default: empty). Not part of any cache key:
        it changes no result.
    receipt_key_file : str
        Ed25519 private key (PEM, ``fed-unlearn receipt new-key``) that signs
        ``receipt.json`` after an unlearning; empty = no receipt (default:
        empty). Not part of any cache key.
    eval_max_new_tokens : int, optional
        Greedy generation length for ROUGE (default: preset).
    eval_batch_size : int
        Evaluation batch size (default: 16).
    eval_max_items : int
        At most this many items per evaluation split, evenly spaced so every
        person is represented; 0 (:data:`ALL_ITEMS`) = all (default: 30).
    eval_curve_items : int
        Items per split of the cheap per-round evaluation (forgetting curves,
        server side, simulation data); 0 (:data:`OFF`) = off (default: 10).
    eval_gradnorm : bool
        Also compute the GradNorm MIA (``mia_gradnorm``: one backward pass per
        forget / holdout item; default: False).
    eval_relearn_steps : int
        Relearning attack (:mod:`fed_unlearn.metrics.relearn`): fine-tune the
        original, retrained and unlearned adapters this many steps on part of the
        forget set and score the rest; 0 (:data:`OFF`) = off (default: 0).
    eval_relearn_fraction : float
        Share of each forgotten person's items the attacker trains on
        (default: 0.5).
    eval_relearn_lr : float
        The attack's AdamW learning rate; 0 (:data:`FIFTH_OF_LR`) = a fifth of
        the run's ``lr``
        (default: 0; at the run's own rate the attack also disturbs the facts
        it does not train on, and the original model's probes fall).
    eval_relearn_benign_rounds : int
        Benign relearning (:mod:`fed_unlearn.metrics.relearn`, scenario (a)):
        this many more FL rounds of the remaining clients from the original,
        retrained and unlearned adapters, the forget set scored after each;
        0 (:data:`OFF`) = off (default: 0).
    eval_attribution : bool
        Measure the MLP-neuron attribution of the original, unlearned and
        retrained models to the forget answers
        (:mod:`fed_unlearn.metrics.attribution`: histograms, neurons that
        turned negative, positive against negative mass; one forward and one
        backward per forget item and model; default: False).
    eval_attribution_tau : float
        A neuron "turned negative" when its mean attribution went from >= 0 in
        the original model to < -τ, with τ this many times the original's mean
        |attribution| over neurons (default: 1.0).
    out_dir : str
        Where results go (default: ``"runs/latest"``).
    mode : str
        What a ``flwr run`` of the ServerApp does: ``"run"`` (FL, departure,
        unlearning, oracle: the simulation's main job), ``"train"`` (FL only; the
        history is kept in ``federation-dir``) or ``"forget"`` (the departure
        of ``depart`` from ``federation-dir``, no FL) (default: ``"run"``).
    federation_dir : str
        Directory of the federation's persistent history on the server's host,
        for ``mode`` train and forget (default: empty).
    departed_online : bool
        Whether departed clients still answer requests after their departure
        (methods that need their cooperation, e.g. MPU or FOUL ``live``, require
        it; default: True, as in a simulation).
    sequential : bool
        Continual unlearning (simulations, ``fed-unlearn run``): the clients of
        ``depart`` ask to be forgotten one after another, in the order given,
        each request served from the previous one's unlearned adapter with the
        federation's unlearning ledger updated (as ``fed-unlearn forget``
        would), its retrain oracle being FL without every client departed so
        far; ``run.json`` gets a per-request record (default: False: the
        departed clients leave together, one request). ``flwr run`` serves one
        request per ``mode = "forget"`` run instead.
    method_options : dict[str, Any]
        Options of the unlearning method, given as ``method-<option>`` keys
        (e.g. ``method-kappa = 0.5``); validated against the method's config
        dataclass.
    """

    preset: str = "smollm2"
    model_path: str = ""
    data_dir: str = ""
    seed: int = 0
    num_clients: int = 3
    people_per_client: int = 3
    holdout_people: int = 3
    qa_per_person: int = 10
    general_probes: int = 24
    domains: int = OFF
    audit_fraction: float = 0.0
    depart: str = "2"
    method: str = "foul_server"
    num_server_rounds: int | None = PRESET
    fraction_train: float = 1.0
    local_epochs: int | None = PRESET
    batch_size: int | None = PRESET
    max_length: int | None = PRESET
    lr: float | None = PRESET
    lora_r: int | None = PRESET
    lora_alpha: int | None = PRESET
    lora_dropout: float = 0.0
    aggregation: str = "fedavg"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_eta: float = 0.01
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    server_lr: float = 1.0
    server_momentum: float = 0.9
    dual_adapter: bool = False
    dual_k_weight: float = 0.1
    dual_v_weight: float = 0.1
    dual_layer: int = -1
    history_dtype: str = "float32"
    history_key_file: str = ""
    receipt_key_file: str = ""
    eval_max_new_tokens: int | None = PRESET
    eval_batch_size: int = 16
    eval_max_items: int = 30
    eval_curve_items: int = 10
    eval_gradnorm: bool = False
    eval_relearn_steps: int = OFF
    eval_relearn_fraction: float = 0.5
    eval_relearn_lr: float = FIFTH_OF_LR
    eval_relearn_benign_rounds: int = OFF
    eval_attribution: bool = False
    eval_attribution_tau: float = 1.0
    out_dir: str = "runs/latest"
    mode: str = "run"
    federation_dir: str = ""
    departed_online: bool = True
    sequential: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, client: bool = False) -> RunConfig:
        """Build from flat hyphenated keys, rejecting unknown keys.

        Keys of Flower's own (``server-round``, ``phase``, ...) must be removed by
        the caller; keys starting with ``x-`` are kept in ``extra`` untouched.

        Parameters
        ----------
        flat : Mapping[str, Any]
            E.g. ``context.run_config`` or a message's ConfigRecord.
        client : bool
            The client's view of a run (:func:`fed_unlearn.protocol.decode_run`):
            no departure is known there, so ``depart`` is empty (reading
            :meth:`departed` raises) and is not validated against
            ``num-clients`` (default: False).

        Returns
        -------
        RunConfig
            Validated configuration.

        Raises
        ------
        ConfigError
            Unknown key or bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {
            "extra",
            "method_options",
        }
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        options: dict[str, Any] = {}
        unknown = []
        for key, value in flat.items():
            if key.startswith("x-"):
                extra[key] = value
                continue
            if key == METHOD_OPTIONS_KEY:
                options.update(parse_method_options(str(value)))
                continue
            if key.startswith(METHOD_OPTION_PREFIX):
                options[key[len(METHOD_OPTION_PREFIX) :]] = value
                continue
            name = key.replace("-", "_")
            if name not in names:
                unknown.append(key)
                continue
            kwargs[name] = value
        if unknown:
            valid = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise ConfigError(
                f"unknown config key(s) {sorted(unknown)}; valid keys: {valid}"
            )
        for name in PRESET_FIELDS:
            # Flower run configs cannot hold None: PRESET_FLAT stands for PRESET
            if name in kwargs and kwargs[name] in (PRESET_FLAT, 0.0, "0"):
                kwargs[name] = PRESET
        if client:
            kwargs["depart"] = ""
        cfg = cls(**kwargs, method_options=options, extra=extra)
        return cfg.validated(departure=not client)

    def to_flat(self) -> dict[str, Any]:
        """Return flat hyphenated keys (``None`` values dropped).

        Returns
        -------
        dict[str, Any]
            Suitable for a Flower ConfigRecord.
        """
        return _flat(self, frozenset())

    # ------------------------------------------------------------ validation
    def validated(self, *, departure: bool = True) -> RunConfig:
        """Coerce types and check values; return ``self``.

        Parameters
        ----------
        departure : bool
            Also check ``depart`` against ``num-clients`` (default: True; the
            client's view of a run has no departure).

        Raises
        ------
        ConfigError
            Naming the key and the problem.
        """
        for f in dataclasses.fields(self):
            if f.name in _NOT_FLAT:
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            try:
                # `--set depart=1` or `depart = 1` in TOML: digits typed where a
                # string goes are that string (the strict rules of `coerce`)
                value = coerce(value, scalar_kind(f.type), strict=True)
            except (TypeError, ValueError) as exc:
                key = f.name.replace("_", "-")
                raise ConfigError(
                    f"config key {key!r}: bad value {value!r} ({exc})"
                ) from exc
            setattr(self, f.name, value)
        if self.preset not in PRESETS:
            raise ConfigError(
                f"config key 'preset': unknown preset {self.preset!r}; "
                f"choose one of {', '.join(PRESETS)}"
            )
        if self.num_clients < 2:
            raise ConfigError(
                f"config key 'num-clients' must be >= 2, got {self.num_clients}"
            )
        if self.eval_max_items < ALL_ITEMS:
            raise ConfigError("config key 'eval-max-items' must be >= 0")
        if self.eval_relearn_steps < OFF:
            raise ConfigError("config key 'eval-relearn-steps' must be >= 0 (0 = off)")
        if self.eval_relearn_benign_rounds < OFF:
            raise ConfigError(
                "config key 'eval-relearn-benign-rounds' must be >= 0 (0 = off)"
            )
        if self.eval_relearn_lr < FIFTH_OF_LR:
            raise ConfigError(
                "config key 'eval-relearn-lr' must be >= 0 (0 = a fifth of lr)"
            )
        if not (
            math.isfinite(self.eval_attribution_tau) and self.eval_attribution_tau >= 0
        ):
            raise ConfigError(
                "config key 'eval-attribution-tau' must be a finite number >= 0, "
                f"got {self.eval_attribution_tau}"
            )
        if not 0 < self.eval_relearn_fraction < 1:
            raise ConfigError(
                "config key 'eval-relearn-fraction' must be in (0, 1), got "
                f"{self.eval_relearn_fraction}"
            )
        from fed_unlearn.methods.registry import METHOD_REGISTRY, get_method

        if self.method_options or self.method in METHOD_REGISTRY:
            # an unknown method name is the CLI's error to report (it lists them)
            try:
                get_method(self.method, self.method_options).check_run(self.to_flat())
            except (KeyError, ValueError, TypeError) as exc:
                msg = exc.args[0] if exc.args else str(exc)
                raise ConfigError(f"method options: {msg}") from exc
        for key in (
            "num_server_rounds",
            "local_epochs",
            "batch_size",
            "max_length",
            "lr",
            "lora_r",
            "lora_alpha",
        ):
            value = getattr(self, key)
            if value is not PRESET and not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"config key {key.replace('_', '-')!r} must be >= 0 (0 = the "
                    f"preset's default), got {value}"
                )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(
                f"config key 'lora-dropout' must be in [0, 1), got {self.lora_dropout}"
            )
        for key in ("people_per_client", "qa_per_person", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key.replace('_', '-')!r} must be >= 1")
        if not self.data_dir:
            # the synthetic data set's bounds, checked before any work starts
            from fed_unlearn.data.synthetic import MIN_QA_PER_PERSON, max_qa_per_person

            low, high = MIN_QA_PER_PERSON, max_qa_per_person()
            if not low <= self.qa_per_person <= high:
                raise ConfigError(
                    f"config key 'qa-per-person' must be between {low} and {high} "
                    f"for the synthetic data (one pair per attribute of a person), "
                    f"got {self.qa_per_person}"
                )
        if not 0 <= self.domains <= self.num_clients:
            raise ConfigError(
                "config key 'domains' must be between 0 (off) and num-clients "
                f"({self.num_clients}), got {self.domains}"
            )
        if not (
            math.isfinite(self.audit_fraction) and 0.0 <= self.audit_fraction < 1.0
        ):
            raise ConfigError(
                "config key 'audit-fraction' must be in [0, 1), got "
                f"{self.audit_fraction}"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(
                "config key 'fraction-train' must be in (0, 1], got "
                f"{self.fraction_train}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"config key 'aggregation': {self.aggregation!r} is not one of "
                f"{AGGREGATIONS}"
            )
        self._check_strategy()
        if self.history_dtype not in ("float32", "float16"):
            raise ConfigError(
                "config key 'history-dtype' must be 'float32' or 'float16'"
            )
        if self.mode not in ("run", "train", "forget"):
            raise ConfigError(
                "config key 'mode' must be 'run', 'train' or 'forget', "
                f"got {self.mode!r}"
            )
        if self.mode != "run" and not self.federation_dir:
            raise ConfigError(f"mode {self.mode!r} needs config key 'federation-dir'")
        if self.dual_adapter and self.aggregation != "fedavg":
            raise ConfigError(
                "config key 'dual-adapter' needs aggregation 'fedavg' (product_svd "
                "re-factorises the adapter and mixes K and V ranks)"
            )
        try:
            DualSpec(1, self.dual_k_weight, self.dual_v_weight, self.dual_layer)
        except ValueError as exc:
            raise ConfigError(f"config key {exc}") from None
        if departure:
            self.departed()  # validates 'depart'
        return self

    # ----------------------------------------------------------- resolution
    def _check_strategy(self) -> None:
        """Check ``strategy`` and its hyper-parameters (:data:`STRATEGY_KEYS`)."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"config key 'strategy': {self.strategy!r} is not one of {STRATEGIES}"
            )
        if self.strategy != "fedavg" and self.aggregation != "fedavg":
            raise ConfigError(
                f"config key 'strategy' {self.strategy!r} needs aggregation "
                f"'fedavg' (Flower's strategies average the LoRA factors), got "
                f"{self.aggregation!r}"
            )
        own = STRATEGY_KEYS[self.strategy]
        for key in sorted(_ALL_STRATEGY_KEYS):
            name = key.replace("-", "_")
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"config key {key!r} must be finite, got {value}")
            if key in own:
                continue
            if value != RunConfig.__dataclass_fields__[name].default:
                users = sorted(s for s, ks in STRATEGY_KEYS.items() if key in ks)
                raise ConfigError(
                    f"config key {key!r} is read only by strategy "
                    f"{' / '.join(users)}; this run's strategy is {self.strategy!r}"
                )
        in_range = {
            "proximal-mu": self.proximal_mu >= 0,
            "server-tau": self.server_tau > 0,
            "server-eta": self.server_eta > 0,
            "server-lr": self.server_lr > 0,
            "server-beta-1": 0 <= self.server_beta_1 < 1,
            "server-beta-2": 0 <= self.server_beta_2 < 1,
            "server-momentum": 0 <= self.server_momentum < 1,
        }
        bad = [k for k, ok in in_range.items() if not ok and k in own]
        if bad:
            raise ConfigError(
                f"config key {bad[0]!r} is out of range ({_STRATEGY_RANGES[bad[0]]}), "
                f"got {getattr(self, bad[0].replace('-', '_'))}"
            )

    def resolved(self, *, method_defaults: bool = True) -> ResolvedConfig:
        """Return the frozen config with every :data:`PRESET` value filled in.

        Call it once where a run starts and hand the result on; ``self`` is
        untouched.

        Parameters
        ----------
        method_defaults : bool
            Give the method's options the base model's calibrated defaults
            (:data:`PRESET_METHOD_DEFAULTS`) where the run does not set them
            (default: True). A client's view of a run passes False: the method
            runs on the server, and no method option reaches a client.

        Returns
        -------
        ResolvedConfig
            Fully resolved configuration.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        preset = PRESET_DEFAULTS[self.defaults_key()]
        filled = frozenset(k for k in PRESET_FIELDS if values[k] is PRESET)
        values.update({k: preset[k] for k in filled})
        values["extra"] = dict(self.extra)
        base = PRESET_METHOD_DEFAULTS.get(self.defaults_key(), {}).get(self.method, {})
        given = {g.replace("-", "_") for g in self.method_options}
        by_base = {k: v for k, v in base.items() if method_defaults and k not in given}
        values["method_options"] = {**by_base, **self.method_options}
        filled |= {f"{METHOD_OPTION_PREFIX}{k}" for k in by_base}
        return ResolvedConfig(**values, from_preset=filled)

    def given_flat(self) -> dict[str, Any]:
        """Return :meth:`to_flat`: a RunConfig holds only what was given."""
        return self.to_flat()

    def train_spec(self) -> TrainSpec:
        """Local-training hyper-parameters (:meth:`ResolvedConfig.train_spec`)."""
        return self.resolved().train_spec()

    def lora_spec(self) -> LoraSpec:
        """LoRA hyper-parameters (:meth:`ResolvedConfig.lora_spec`)."""
        return self.resolved().lora_spec()

    def dual_spec(self) -> DualSpec | None:
        """Dual-adapter settings (:meth:`ResolvedConfig.dual_spec`)."""
        return self.resolved().dual_spec()

    def fl_key(self, exclude: tuple[int, ...]) -> str:
        """Cache key of an FL phase (:meth:`ResolvedConfig.fl_key`)."""
        return self.resolved().fl_key(exclude)


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(_Clients):
    """A run's configuration with every preset-dependent value filled in.

    Made by :meth:`RunConfig.resolved` (once, where a run starts) and read by the
    rest of the run; frozen, so no part of a run sees another value than the
    others. Its fields are :class:`RunConfig`'s, in the same order and with the
    same meaning (documented there), except that the :data:`PRESET_FIELDS` hold
    the preset's value where none was given, never :data:`PRESET`.

    Parameters
    ----------
    from_preset : frozenset[str]
        The fields whose value came from the preset, and as ``method-<option>``
        the method options from :data:`PRESET_METHOD_DEFAULTS` (not compared,
        not a flat key): :meth:`given_flat` leaves them out, as the run was given.
    """

    preset: str
    model_path: str
    data_dir: str
    seed: int
    num_clients: int
    people_per_client: int
    holdout_people: int
    qa_per_person: int
    general_probes: int
    domains: int
    audit_fraction: float
    depart: str
    method: str
    num_server_rounds: int
    fraction_train: float
    local_epochs: int
    batch_size: int
    max_length: int
    lr: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    aggregation: str
    strategy: str
    proximal_mu: float
    server_eta: float
    server_beta_1: float
    server_beta_2: float
    server_tau: float
    server_lr: float
    server_momentum: float
    dual_adapter: bool
    dual_k_weight: float
    dual_v_weight: float
    dual_layer: int
    history_dtype: str
    history_key_file: str
    receipt_key_file: str
    eval_max_new_tokens: int
    eval_batch_size: int
    eval_max_items: int
    eval_curve_items: int
    eval_gradnorm: bool
    eval_relearn_steps: int
    eval_relearn_fraction: float
    eval_relearn_lr: float
    eval_relearn_benign_rounds: int
    eval_attribution: bool
    eval_attribution_tau: float
    out_dir: str
    mode: str
    federation_dir: str
    departed_online: bool
    sequential: bool
    method_options: dict[str, Any]
    extra: dict[str, Any] = field(repr=False)
    from_preset: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_flat(self) -> dict[str, Any]:
        """Return every flat hyphenated key with the value the run uses.

        Returns
        -------
        dict[str, Any]
            What ``run.json`` shows as the run's ``config`` (and the FL cache
            key hashes); ``RunConfig.from_flat`` of it is the same run.
        """
        return _flat(self, frozenset())

    def given_flat(self) -> dict[str, Any]:
        """Return the flat keys as the run was given (preset values left out).

        Returns
        -------
        dict[str, Any]
            :meth:`RunConfig.to_flat` of the config this was resolved from: what
            travels to the clients (:func:`fed_unlearn.protocol.encode_run`),
            which resolve it the same way.
        """
        return _flat(self, self.from_preset)

    def relearn_lr(self) -> float:
        """Return the relearning attack's rate (:data:`FIFTH_OF_LR`: ``lr`` / 5)."""
        return self.eval_relearn_lr or float(self.lr) / 5

    def train_spec(self) -> TrainSpec:
        """Local-training hyper-parameters of this config."""
        return TrainSpec(
            epochs=int(self.local_epochs),
            batch_size=int(self.batch_size),
            lr=float(self.lr),
            max_length=int(self.max_length),
        )

    def lora_spec(self) -> LoraSpec:
        """LoRA hyper-parameters of this config."""
        k = 2 if self.dual_adapter else 1  # dual: K and V side by side
        return LoraSpec(
            r=k * int(self.lora_r),
            alpha=k * int(self.lora_alpha),
            dropout=float(self.lora_dropout),
        )

    def dual_spec(self) -> DualSpec | None:
        """Return the dual-adapter settings, or ``None`` for a single adapter."""
        if not self.dual_adapter:
            return None
        return DualSpec(
            split=int(self.lora_r),
            k_weight=self.dual_k_weight,
            v_weight=self.dual_v_weight,
            layer=self.dual_layer,
        )

    def fl_key(self, exclude: tuple[int, ...]) -> str:
        """Hash of everything that determines an FL phase's result.

        Parameters
        ----------
        exclude : tuple[int, ...]
            Clients left out (empty for the original run, the departed ones for
            the retrain oracle).

        Returns
        -------
        str
            16 hex characters; the cache key of the phase.
        """
        r = self
        keep = {
            k: v
            for k, v in r.to_flat().items()
            if k
            not in (
                "depart",
                "method",
                "out-dir",
                "eval-max-new-tokens",
                "eval-batch-size",
                "eval-gradnorm",
                "eval-relearn-steps",
                "eval-relearn-fraction",
                "eval-relearn-lr",
                "eval-relearn-benign-rounds",
                "eval-attribution",
                "eval-attribution-tau",
                "departed-online",
                "sequential",
                "history-key-file",
                "mode",
                "federation-dir",
                "receipt-key-file",
            )
            # x- keys are notes, except the fault injections: a faulty run's
            # phase must not be reused by a normal one
            and (
                k.startswith("x-fault-")
                or not k.startswith(("x-", METHOD_OPTION_PREFIX))
            )
            # ... but a server killed after an unlearning round: the FL phases
            # before it are a normal run's
            and k != KILL_ROUND_KEY
            # the dual settings change nothing while the dual adapter is off
            and (r.dual_adapter or not k.startswith("dual-"))
            # nor the hyper-parameters of another strategy than the run's
            # (and plain FedAvg leaves the key out: the phases cached before
            # there was a choice keep their keys)
            and (k in STRATEGY_KEYS[r.strategy] or k not in _ALL_STRATEGY_KEYS)
            and (k != "strategy" or r.strategy != "fedavg")
        }
        # evaluation-only data settings: no FL phase reads them, so any value
        # reuses the phase; they stay in the hash at their defaults, which keeps
        # the keys of phases cached before they were known to be evaluation-only
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        for key in EVAL_ONLY_DATA_KEYS:
            keep[key] = defaults[key.replace("-", "_")]
        # 'domains' came later: at 0 (the data as before) it stays out of the
        # hash, so phases cached before the key existed keep their keys
        if not r.domains:
            keep.pop("domains", None)
        if not r.audit_fraction:  # likewise
            keep.pop("audit-fraction", None)
        if r.data_dir:
            # the data's content, not its path: an edited file is new data, and
            # a relative and an absolute path to the same files are the same
            keep["data-dir"] = data_fingerprint(r.data_dir)
        keep["exclude"] = list(exclude)
        keep["recipe"] = [FL_RECIPE_VERSION, SYSTEM_PROMPT]
        keep["model"] = model_identity(self.preset, self.model_path or None)
        if tag := numerics.cache_tag():  # the native mode adds nothing: old keys stay
            keep["numerics"] = tag
        blob = json.dumps(keep, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Either form, for code that reads only what both hold (the departure, the data
#: and model settings, :meth:`~ResolvedConfig.given_flat`, the specs and keys).
AnyConfig = RunConfig | ResolvedConfig
