"""Server-side orchestration: FL phase -> departure -> unlearning -> retrain oracle.

FL phases (the original run and the retrain oracle) are cached by config hash in
``<cache>/runs/fl-<hash>`` (history store + ``phase.json``), so several methods and
several output directories reuse one computation. A phase directory is written in
a temporary place and renamed when complete, so an interrupted run leaves no
half-written cache entry.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    Message,
    MessageType,
    MetricRecord,
)

from fed_unlearn import adapters as ad
from fed_unlearn.config import SERVER_OPTIMIZERS, ResolvedConfig
from fed_unlearn.history import HistoryError, HistoryStore, load_key
from fed_unlearn.journal import KILL_ROUND_KEY, UnlearnJournal
from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.methods.rounds import uses_oracle
from fed_unlearn.metrics.quick import t2f_delta
from fed_unlearn.models import (
    cache_root,
    init_adapter,
    load_lora_model,
    resolve_model_dir,
    set_adapter,
)
from fed_unlearn.protocol import (
    AuditRequest,
    EvaluateReply,
    EvaluateRequest,
    HelloReply,
    HelloRequest,
    ProtocolError,
)
from fed_unlearn.scratch import scratch_dir
from server.channel import FlowerChannel, decode_reply, encode_request, run_record
from server.grid import CountingGrid
from server.strategy import history_strategy, replay_server_steps

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """The pipeline cannot go on (missing clients, history, or Flower grid)."""


def runs_root() -> Path:
    """Directory of cached FL phases (``$FED_UNLEARN_RUNS`` or ``<cache>/runs``)."""
    env = os.environ.get("FED_UNLEARN_RUNS")
    root = Path(env) if env else cache_root() / "runs"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class PhaseResult:
    """A finished FL phase.

    Parameters
    ----------
    final : dict[str, torch.Tensor]
        Final global adapter.
    stats : dict[str, Any]
        ``wall_time_s``, ``bytes`` {down, up, total}, ``rounds``, per-round log.
    path : Path
        Phase directory (history store under ``history/``).
    cached : bool
        Whether it came from the cache.
    key : bytes, optional
        The history's encryption key (never written anywhere).
    """

    final: dict[str, torch.Tensor]
    stats: dict[str, Any]
    path: Path
    cached: bool = False
    key: bytes | None = field(default=None, repr=False)

    @property
    def history(self) -> HistoryStore:
        """The phase's history store."""
        return HistoryStore(self.path / "history", key=self.key)


def history_key(cfg: ResolvedConfig) -> bytes | None:
    """Return the history key of a run: ``history-key-file``, else the environment.

    Raises
    ------
    PipelineError
        If the key file is unreadable or holds no valid key.
    """
    try:
        return load_key(cfg.history_key_file or None)
    except HistoryError as exc:
        raise PipelineError(str(exc)) from exc


def phase_dir(
    cfg: ResolvedConfig, exclude: tuple[int, ...], node_data: str = ""
) -> Path:
    """Cache directory of an FL phase.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (:meth:`~fed_unlearn.config.ResolvedConfig.fl_key`).
    exclude : tuple[int, ...]
        Clients left out.
    node_data : str
        :func:`node_data_tag` of the clients' hellos: empty when every client
        takes its partition of the run's data set (the run config then
        determines the phase).
    """
    suffix = f"-{node_data}" if node_data else ""
    return runs_root() / f"fl-{cfg.fl_key(exclude)}{suffix}"


def node_data_tag(versions: Mapping[int, int]) -> str:
    """Return the part of an FL cache key that node-local data adds.

    Parameters
    ----------
    versions : Mapping[int, int]
        Client id -> its hello's ``data-version`` (0: the run's data set).

    Returns
    -------
    str
        Empty when no client reads node-local data; else ``"n"`` and 15 hex
        characters of a hash of the clients' data versions, so a phase is
        reused only while every node's data is unchanged.
    """
    local = sorted((c, v) for c, v in versions.items() if v)
    if not local:
        return ""
    return "n" + hashlib.sha256(json.dumps(local).encode()).hexdigest()[:15]


def load_phase(
    cfg: ResolvedConfig, exclude: tuple[int, ...], node_data: str = ""
) -> PhaseResult | None:
    """Load a cached FL phase, validating its history; ``None`` if absent.

    ``node_data`` is :func:`phase_dir`'s (the clients' node-local data, if any).

    Raises
    ------
    PipelineError
        If the cache entry exists but its history is corrupt.
    """
    path = phase_dir(cfg, exclude, node_data)
    if not (path / "phase.json").is_file():
        return None
    key = history_key(cfg)
    store = HistoryStore(path / "history", key=key)
    if store.encrypted != (key is not None):
        state = "encrypted" if store.encrypted else "not encrypted"
        has = "no history key" if key is None else "a history key"
        raise PipelineError(
            f"cached FL phase {path}: its history is {state}, but this run has "
            f"{has}; convert it with `fed-unlearn history rekey {path / 'history'}` "
            "or delete that directory to recompute it"
        )
    try:
        store.validate()
        final = store.final()
    except HistoryError as exc:
        raise PipelineError(
            f"cached FL phase {path} has a corrupt history ({exc}); delete that "
            "directory to recompute it"
        ) from exc
    try:
        stats = json.loads((path / "phase.json").read_text())
        if not isinstance(stats, dict):
            raise ValueError(f"a JSON {type(stats).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PipelineError(
            f"cached FL phase {path}: {path / 'phase.json'} is unreadable ({exc}); "
            "delete that directory to recompute it"
        ) from exc
    return PhaseResult(final, stats, path, cached=True, key=key)


#: ``curve_data`` of a phase whose per-round curve the server measured on the
#: data set the clients train on (synthetic from the seed, or ``data-dir``).
CURVE_CLIENTS = "clients'"
#: ``curve_data`` of a phase without a per-round curve: clients read node-local
#: data the server does not hold, ``eval-curve-items`` is 0, or the server
#: cannot read the data.
CURVE_NONE = "none"


def curve_data(local_data: dict[int, bool]) -> str:
    """Decide, from the hello replies, whether the server may draw a curve.

    The server's per-round curve is measured on its own copy of the run's data
    set. That is the clients' data only when every client takes its partition
    of that data set; a client that reads its own ``data-path`` trains on data
    the server never saw, and a curve on the server's data would say nothing
    about it.

    Parameters
    ----------
    local_data : dict[int, bool]
        Client id -> its hello's ``local-data`` flag.

    Returns
    -------
    str
        :data:`CURVE_CLIENTS` when no client reads node-local data, else
        :data:`CURVE_NONE`.

    Raises
    ------
    ValueError
        No client (nothing to decide on).
    """
    if not local_data:
        raise ValueError("curve_data needs the hello replies of the clients")
    local = sorted(c for c, flag in local_data.items() if flag)
    if local:
        log.warning(
            "client(s) %s read node-local data-path: the server measures no "
            "per-round curve (it holds none of their data); the federated "
            "evaluation is what the clients measured",
            local,
        )
        return CURVE_NONE
    return CURVE_CLIENTS


def discover_clients(
    grid: Any, cfg: ResolvedConfig, timeout: float = 300.0
) -> tuple[dict[int, int], dict[int, int]]:
    """Wait for all SuperNodes and map Flower node ids to client ids.

    Parameters
    ----------
    grid : Grid
        Flower grid.
    cfg : ResolvedConfig
        Run config (``num-clients`` nodes are expected).
    timeout : float
        Seconds to wait for nodes.

    Returns
    -------
    tuple[dict[int, int], dict[int, int]]
        Node id -> client id, and client id -> its hello's ``data-version``:
        0 when it takes its partition of the run's data set, else the opaque
        tag of the node-local data it reads (:func:`node_data_tag`).
    """
    t0 = time.time()
    while len(list(grid.get_node_ids())) < cfg.num_clients:
        if time.time() - t0 > timeout:
            raise PipelineError(
                f"only {len(list(grid.get_node_ids()))} of {cfg.num_clients} "
                "SuperNodes "
                f"connected within {timeout:.0f} s"
            )
        time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    content = encode_request(HelloRequest(), run_record(cfg))
    msgs = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
        for n in nodes
    ]
    replies = grid.send_and_receive(msgs, timeout=timeout)
    mapping: dict[int, int] = {}
    versions: dict[int, int] = {}
    for rep in replies:
        if rep.has_error():
            raise PipelineError(
                f"node {rep.metadata.src_node_id} failed to answer: {rep.error.reason}"
            )
        try:
            hello = decode_reply("hello", rep)
        except ProtocolError as exc:
            raise PipelineError(f"node {rep.metadata.src_node_id}: {exc}") from exc
        assert isinstance(hello, HelloReply)
        cid = hello.client_id
        if cid in mapping.values():
            raise PipelineError(f"two SuperNodes claim client id {cid}")
        if hello.local_data != bool(hello.data_version):
            raise PipelineError(
                f"node {rep.metadata.src_node_id}: its hello says local-data="
                f"{hello.local_data} but data-version={hello.data_version}"
            )
        if 0 <= cid < cfg.num_clients:
            mapping[rep.metadata.src_node_id] = cid
            versions[cid] = hello.data_version
        else:
            log.warning(
                "ignoring SuperNode with client id %d (num-clients=%d)",
                cid,
                cfg.num_clients,
            )
    ids = sorted(mapping.values())
    if ids != list(range(cfg.num_clients)):
        raise PipelineError(
            f"SuperNodes report client ids {ids}; "
            f"expected 0..{cfg.num_clients - 1} once each"
        )
    return mapping, versions


def curve_evaluator(
    cfg: ResolvedConfig, source: str = CURVE_CLIENTS
) -> Callable[[int, ArrayRecord], MetricRecord | None] | None:
    """Per-round server-side evaluation hook (forget/retain ``Q_A_Prob``).

    Runs only where the server's data is the clients' (synthetic data, or a
    ``data-dir`` visible to the server, i.e. simulations): returns ``None`` when
    ``source`` (:func:`curve_data`) is not :data:`CURVE_CLIENTS`, when the
    server cannot read the data, or when ``eval-curve-items`` is 0.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration.
    source : str
        :func:`curve_data`'s decision on the clients' hello replies.

    Returns
    -------
    Callable or None
        ``(round, arrays) -> MetricRecord`` for Flower's ``Strategy.start``.
    """
    if cfg.eval_curve_items <= 0 or source != CURVE_CLIENTS:
        return None
    from clients.task import dataset
    from fed_unlearn.metrics.quick import answer_prob, spread_items
    from fed_unlearn.models import prompt_formatter

    try:
        data = dataset(cfg)
    except (OSError, ValueError) as exc:
        log.warning(
            "no per-round evaluation: the server cannot read the data (%s)", exc
        )
        return None
    n = cfg.eval_curve_items
    departed = cfg.departed()
    forget = spread_items(data.forget_items(departed), n)
    retain = spread_items(data.retain_items(departed), n)
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    max_length = int(cfg.max_length)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter(model, arrays.to_torch_state_dict())
        return MetricRecord(
            {
                "forget_Q_A_Prob": answer_prob(
                    model, tok, prompt_fn, forget, max_length
                ),
                "retain_Q_A_Prob": answer_prob(
                    model, tok, prompt_fn, retain, max_length
                ),
            }
        )

    return evaluate_fn


def prototype_maker(
    cfg: ResolvedConfig,
) -> Callable[[dict[str, torch.Tensor]], list[float]] | None:
    """Build the server's dual prototype: global adapter -> public-probe prototype.

    The K-invariance target of a dual-adapter run
    (:func:`fed_unlearn.dual.public_prototype`): the server's own model, the
    public general-knowledge probes and the adapter it is about to send; no
    data of any client and no statistic a client sent.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration.

    Returns
    -------
    Callable or None
        ``adapter -> prototype``; ``None`` without ``dual-adapter``.
    """
    from fed_unlearn.dual import public_prototype
    from fed_unlearn.models import prompt_formatter

    spec = cfg.dual_spec()
    if spec is None:
        return None
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    max_length = int(cfg.max_length)

    def make(state: dict[str, torch.Tensor]) -> list[float]:
        set_adapter(model, state)
        return public_prototype(model, tok, prompt_fn, spec, max_length)

    return make


def _state_evaluator(
    cfg: ResolvedConfig, source: str
) -> tuple[Callable[[dict[str, torch.Tensor]], dict[str, float]] | None, list[float]]:
    """Wrap :func:`curve_evaluator` for methods: adapter -> metrics (timed)."""
    fn = curve_evaluator(cfg, source)
    spent = [0.0]
    if fn is None:
        return None, spent

    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        rec = fn(0, ArrayRecord(state))
        spent[0] += time.perf_counter() - t0
        return {k: float(v) for k, v in dict(rec).items()}  # type: ignore[arg-type]

    return evaluate, spent


def _self_audit(
    channel: FlowerChannel, departed: tuple[int, ...]
) -> Callable[[dict[str, torch.Tensor]], float]:
    """Build the departed clients' self-audit: their size-weighted mean gap."""

    def audit(state: dict[str, torch.Tensor]) -> float:
        replies = channel.query(dict.fromkeys(departed, AuditRequest(state)))
        sizes = {c: float(rep.num_examples) for c, rep in replies.items()}
        total = sum(sizes.values())
        return sum(rep.audit_gap * sizes[c] for c, rep in replies.items()) / total

    return audit


def _forget_target(
    train: PhaseResult, retrain: PhaseResult
) -> tuple[float, float] | None:
    """``(oracle level, delta)`` of the T2F rule from the phases' curves."""
    a, b = train.stats.get("curve") or [], retrain.stats.get("curve") or []
    if not (a and b):
        return None
    oracle = float(b[-1]["forget_Q_A_Prob"])
    return oracle, t2f_delta(float(a[-1]["forget_Q_A_Prob"]), oracle)


def run_fl_phase(
    grid: CountingGrid | None,
    cfg: ResolvedConfig,
    node_map: dict[int, int] | None,
    exclude: tuple[int, ...],
    initial: dict[str, torch.Tensor],
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    curve: str = CURVE_CLIENTS,
    node_data: str = "",
) -> PhaseResult:
    """Run (or load from cache) FedAvg over all clients but ``exclude``.

    Parameters
    ----------
    grid : CountingGrid, optional
        Counting Flower grid; ``None`` only works when the phase is cached.
    cfg : ResolvedConfig
        Run configuration.
    node_map : dict[int, int], optional
        Node id -> client id.
    exclude : tuple[int, ...]
        Clients left out.
    initial : dict[str, torch.Tensor]
        Initial adapter (seed-determined).
    on_round : Callable, optional
        Progress callback.
    curve : str
        :func:`curve_data`'s decision: whether the server measures a
        per-round curve (recorded as the phase's ``curve_data``).
    node_data : str
        :func:`node_data_tag` of the clients' hellos (default: empty, the
        run's data set): the run config alone does not determine a phase on
        node-local data, so its cache entry is keyed on that data's versions
        too.

    Returns
    -------
    PhaseResult
        Final adapter, costs, history location.
    """
    cached = load_phase(cfg, exclude, node_data)
    if cached is not None:
        log.info("FL phase excluding %s: cached at %s", list(exclude), cached.path)
        return cached
    final_dir = phase_dir(cfg, exclude, node_data)
    if grid is None or node_map is None:
        raise PipelineError(
            "this FL phase is not cached and no Flower grid is available"
        )
    tmp = scratch_dir(final_dir)  # and stale ones of killed runs are removed
    key = history_key(cfg)
    store = HistoryStore(tmp / "history", dtype=cfg.history_dtype, key=key)
    strategy = history_strategy(
        cfg,
        run=run_record(cfg),
        node_to_client=node_map,
        exclude=exclude,
        history=store,
        on_round=on_round,
        prototype_fn=prototype_maker(cfg),
    )
    evaluate_fn = curve_evaluator(cfg, curve)
    eval_spent = [0.0]

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        assert evaluate_fn is not None
        te = time.perf_counter()
        try:
            return evaluate_fn(server_round, arrays)
        finally:
            eval_spent[0] += time.perf_counter() - te

    down0, up0 = grid.snapshot()
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid,  # type: ignore[arg-type]
        initial_arrays=ArrayRecord(initial),
        num_rounds=int(cfg.num_server_rounds),
        timeout=3600,
        evaluate_fn=timed_evaluate if evaluate_fn is not None else None,
    )
    points = [
        {"round": int(rnd), **{k: float(v) for k, v in dict(rec).items()}}
        for rnd, rec in sorted(result.evaluate_metrics_serverapp.items())
    ]
    wall = time.perf_counter() - t0
    final = (
        result.arrays.to_torch_state_dict() if result.arrays is not None else initial
    )
    final = {k: v.float().clone() for k, v in final.items()}
    store.set_final(final)
    down, up = grid.bytes_down - down0, grid.bytes_up - up0
    stats = {
        "exclude": list(exclude),
        "key": cfg.fl_key(exclude),
        # the nodes' own data, when some read it (node_data_tag; "" = none)
        "node_data": node_data,
        "wall_time_s": wall,
        # the per-round curve evaluation inside wall_time_s: a simulation
        # measurement (the server reads the clients' data), not a cost of FL
        "curve_eval_s": eval_spent[0],
        "bytes": {"down": down, "up": up, "total": down + up},
        "rounds": int(cfg.num_server_rounds),
        "round_log": strategy.round_log,
        "history_bytes_per_round": [store.round_nbytes(i) for i in store.rounds()],
        "curve": points,
        # what the curve was measured on: the clients' data set, or no curve
        "curve_data": CURVE_CLIENTS if evaluate_fn is not None else CURVE_NONE,
    }
    (tmp / "phase.json").write_text(json.dumps(stats, indent=2, default=str))
    try:
        os.replace(tmp, final_dir)
    except OSError:  # another process finished the same phase first
        shutil.rmtree(tmp, ignore_errors=True)
    return PhaseResult(final, stats, final_dir, cached=False, key=key)


FEDERATION = "federation"


def save_federation(phase: PhaseResult, run_dir: Path, name: str = FEDERATION) -> Path:
    """Keep an FL run's history beside its run, where it outlives the cache.

    ``run_dir/federation/`` gets a copy of the phase's history store (with its
    encryption, if any) and ``phase.json``. Later departures
    (``fed-unlearn forget``) read it and record what they removed there, in the
    store's unlearning ledger; the FL cache itself is never written again.

    Parameters
    ----------
    phase : PhaseResult
        The finished FL phase.
    run_dir : Path
        The run directory.
    name : str
        The federation directory's name in it (default: ``federation``).

    Returns
    -------
    Path
        The federation directory.

    Raises
    ------
    PipelineError
        If the directory already holds a federation.
    """
    root = run_dir / name
    if root.exists():
        raise PipelineError(f"{root} already holds a federation; it is never replaced")
    tmp = scratch_dir(root)
    shutil.copytree(phase.path / "history", tmp / "history")
    (tmp / "phase.json").write_text(json.dumps(phase.stats, indent=2, default=str))
    os.replace(tmp, root)
    return root


def load_federation(root: Path, key: bytes | None) -> PhaseResult:
    """Open a federation saved by :func:`save_federation` as an FL phase.

    Its ``final`` is the adapter the next departure starts from: the latest
    recorded unlearning's, or the FL run's.

    Raises
    ------
    PipelineError
        If it is missing, or its history is corrupt or has another key.
    """
    store = HistoryStore(root / "history", key=key)
    if not (root / "phase.json").is_file():
        raise PipelineError(f"{root}: not a federation (no phase.json)")
    if store.encrypted != (key is not None):
        has = "no history key" if key is None else "a history key"
        raise PipelineError(
            f"federation {root}: its history is "
            f"{'encrypted' if store.encrypted else 'not encrypted'}, but this run "
            f"has {has}"
        )
    try:
        store.validate()
        current = store.current()
        stats = json.loads((root / "phase.json").read_text())
    except (HistoryError, OSError, ValueError) as exc:
        raise PipelineError(f"federation {root}: {exc}") from exc
    return PhaseResult(current, stats, root, cached=True, key=key)


@dataclass
class PipelineOutput:
    """What the pipeline produced (the CLI evaluates and reports it)."""

    cfg: ResolvedConfig
    train: PhaseResult
    retrain: PhaseResult | None = None
    unlearned: dict[str, torch.Tensor] | None = None
    unlearn_stats: dict[str, Any] = field(default_factory=dict)
    grid: CountingGrid | None = None
    node_map: dict[int, int] | None = None
    federation: Path | None = None


def departure_plan(
    cfg: ResolvedConfig, store: HistoryStore
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Return (departed, remaining, excluded from the oracle) of a departure.

    ``excluded`` is every client forgotten so far plus the departed ones: the
    retrain oracle of a sequence of departures is FL without all of them.

    Raises
    ------
    PipelineError
        A departed client never took part or is already forgotten.
    """
    departed = cfg.departed()
    try:
        seen, forgotten = store.clients(), store.forgotten()
    except HistoryError as exc:
        raise PipelineError(str(exc)) from exc
    never = [c for c in departed if c not in seen]
    if never:
        raise PipelineError(
            f"--depart: client(s) {never} never took part in the FL run"
        )
    again = [c for c in departed if c in forgotten]
    if again:
        raise PipelineError(
            f"client(s) {again} are already forgotten (forgotten so far: {forgotten})"
        )
    remaining = tuple(c for c in cfg.remaining() if c not in forgotten)
    return departed, remaining, tuple(sorted({*forgotten, *departed}))


def run_pipeline(
    grid: Any | None,
    cfg: ResolvedConfig,
    steps: tuple[str, ...] = ("train", "unlearn"),
    on_round: Callable[[str, int, dict[str, Any]], None] | None = None,
    federation: Path | None = None,
    journal: UnlearnJournal | None = None,
) -> PipelineOutput:
    """FL training -> departure -> unlearning -> retrain oracle.

    Parameters
    ----------
    grid : Grid, optional
        Flower grid (``None``: everything needed must be cached).
    cfg : ResolvedConfig
        Validated run configuration.
    steps : tuple[str, ...]
        ``("train",)`` or ``("train", "unlearn")``.
    on_round : Callable, optional
        ``(phase, round, info)`` progress callback.
    federation : Path, optional
        A saved federation (:func:`save_federation`): no FL runs; the departure
        starts from its current adapter, and clients it already forgot stay out.
    journal : UnlearnJournal, optional
        The run's per-round unlearning log, used by a resumable method
        (``resume_refusal()`` is ``None``); one that holds rounds is resumed.
        The fault-injection key ``x-fault-kill-unlearn-round = N`` kills this
        process (SIGKILL) once round N is logged.

    Returns
    -------
    PipelineOutput
        Adapters and costs.
    """
    # fail before any work on an unknown method or option
    method = get_method(cfg.method, cfg.method_options)
    fed = load_federation(federation, history_key(cfg)) if federation else None
    if fed is not None:
        # a bad request is refused before Flower or a model is started
        departure_plan(cfg, fed.history)
    # The server's model first: on one machine it builds the tiny base once,
    # before the SuperNodes load theirs while answering the discovery.
    model_dir = resolve_model_dir(cfg.preset, cfg.model_path or None)
    model, _tok = load_lora_model(model_dir, cfg.lora_spec())
    counting = CountingGrid(grid) if grid is not None else None
    node_map = None
    # without a grid (all cached) the curves are the cached phases' own
    curve = CURVE_CLIENTS
    node_data = ""
    if counting is not None:
        node_map, versions = discover_clients(counting, cfg)
        curve = curve_data({c: bool(v) for c, v in versions.items()})
        # the run config does not determine a phase on node-local data
        node_data = node_data_tag(versions)

    initial = init_adapter(model, cfg.seed)

    def cb(phase: str) -> Callable[[int, dict[str, Any]], None] | None:
        return None if on_round is None else (lambda r, info: on_round(phase, r, info))

    if fed is not None:
        train = fed
    else:
        train = run_fl_phase(
            counting, cfg, node_map, (), initial, cb("train"), curve, node_data
        )
    out = PipelineOutput(
        cfg, train, grid=counting, node_map=node_map, federation=federation
    )
    if "unlearn" not in steps:
        return out
    departed, remaining, excluded = departure_plan(cfg, train.history)

    def retrain() -> dict[str, torch.Tensor]:
        if out.retrain is None:
            out.retrain = run_fl_phase(
                counting,
                cfg,
                node_map,
                excluded,
                initial,
                cb("retrain"),
                curve,
                node_data,
            )
        return out.retrain.final

    # The oracle is a measurement: computed (or loaded from the cache) here for
    # the evaluation, handed to the method only for the research-only
    # stop="oracle" (flagged in run.json, its cost added to the method's).
    retrain()
    assert out.retrain is not None
    oracle_stop = uses_oracle(method.config)
    channel = (
        FlowerChannel(counting, cfg, node_map)
        if counting is not None and node_map is not None
        else None
    )
    evaluate, eval_seconds = _state_evaluator(cfg, curve)
    audit = (
        _self_audit(channel, departed)
        if channel is not None and cfg.audit_fraction and cfg.departed_online
        else None
    )
    ctx = UnlearnContext(
        trained=train.final,
        departed=departed,
        remaining=remaining,
        seed=cfg.seed,
        history=train.history,
        retrain=retrain,
        clients=channel,
        departed_cooperates=cfg.departed_online,
        evaluate=evaluate,
        forget_target=_forget_target(train, out.retrain) if oracle_stop else None,
        dual_split=dual.split if (dual := cfg.dual_spec()) is not None else 0,
        audit=audit,
        server_replay=(
            functools.partial(replay_server_steps, cfg)
            if cfg.strategy in SERVER_OPTIMIZERS
            else None
        ),
        journal=_journal(journal, cfg) if method.resume_refusal() is None else None,
    )
    method.check(ctx)
    down0, up0 = counting.snapshot() if counting is not None else (0, 0)
    requested_at = _utc_now()
    t0 = time.perf_counter()
    res = method.unlearn(ctx)
    wall = time.perf_counter() - t0
    finished_at = _utc_now()
    down, up = counting.snapshot() if counting is not None else (0, 0)
    ad.validate_update(res.adapter, train.final)
    if method.is_oracle:
        # The method *is* the oracle: its cost is the retrain phase's recorded cost.
        wall = out.retrain.stats["wall_time_s"]
        down, up = (
            out.retrain.stats["bytes"]["down"] + down0,
            out.retrain.stats["bytes"]["up"] + up0,
        )
        rounds = out.retrain.stats["rounds"]
    else:
        rounds = res.rounds
    res.info.setdefault("eval_seconds", eval_seconds[0])
    out.unlearned = res.adapter
    out.unlearn_stats = {
        "method": cfg.method,
        "wall_time_s": wall,
        "bytes": {
            "down": down - down0,
            "up": up - up0,
            "total": down - down0 + up - up0,
        },
        "rounds": rounds,
        "info": res.info,
        "oracle_stopped": oracle_stop,
        "is_oracle": method.is_oracle,
        "requested_at": requested_at,
        "finished_at": finished_at,
        "method_config": dataclasses.asdict(method.config),
        # the method's per-round curve: on the clients' data set, or none
        "curve_data": CURVE_CLIENTS if evaluate is not None else CURVE_NONE,
    }
    return out


def _journal(
    journal: UnlearnJournal | None, cfg: ResolvedConfig
) -> UnlearnJournal | None:
    """Return the run's unlearning log, armed with the kill hook of its config."""
    if journal is None or KILL_ROUND_KEY not in cfg.extra:
        return journal
    at = int(cfg.extra[KILL_ROUND_KEY])

    def kill(r: int) -> None:
        if r == at:
            log.warning("fault injection: killing the server after round %d", r)
            os.kill(os.getpid(), signal.SIGKILL)

    journal.after_write = kill
    return journal


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def federated_evaluate(
    grid: CountingGrid,
    cfg: ResolvedConfig,
    node_map: dict[int, int],
    adapters: dict[str, dict[str, torch.Tensor]],
) -> dict[str, dict[str, Any]]:
    """Ask every client to evaluate each adapter on its own data (Flower evaluate).

    This is what a deployment sees without central data: the departed clients'
    ``Q_A_Prob`` is the forget metric, the others' the retain metric. A client
    whose reply fails (a SuperNode that died, a client error) is left out of the
    means and named under ``missing``; a group nobody answered for has no mean
    (``None``), never a made-up 0.

    Parameters
    ----------
    grid : CountingGrid
        Flower grid.
    cfg : ResolvedConfig
        Run configuration.
    node_map : dict[int, int]
        Node id -> client id.
    adapters : dict[str, dict[str, torch.Tensor]]
        Name -> adapter.

    Returns
    -------
    dict[str, dict[str, Any]]
        Adapter name -> {``client-<id>``: Q_A_Prob, ``forget_Q_A_Prob``,
        ``retain_Q_A_Prob`` (example-weighted means over the client groups, or
        ``None``), and ``missing`` ({``client-<id>``: why}) when a client failed}.

    Raises
    ------
    PipelineError
        If no client answered for an adapter.
    """
    departed = set(cfg.departed())
    out: dict[str, dict[str, Any]] = {}
    run = run_record(cfg)
    for name, state in adapters.items():
        record = encode_request(EvaluateRequest(state), run)
        msgs = [
            Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n)
            for n in sorted(node_map)
        ]
        res: dict[str, Any] = {}
        missing = {f"client-{c}": "no reply" for c in node_map.values()}
        groups: dict[str, list[tuple[float, int]]] = {"forget": [], "retain": []}
        for rep in grid.send_and_receive(msgs, timeout=3600):
            cid = node_map.get(rep.metadata.src_node_id)
            if cid is None:
                raise PipelineError(
                    f"federated evaluation: a reply from node "
                    f"{rep.metadata.src_node_id}, which was not asked"
                )
            try:
                if rep.has_error():
                    raise ProtocolError(rep.error.reason)
                reply = decode_reply("evaluate", rep)
            except ProtocolError as exc:
                missing[f"client-{cid}"] = str(exc)
                log.warning("federated evaluation of %s: client %d: %s", name, cid, exc)
                continue
            assert isinstance(reply, EvaluateReply)
            del missing[f"client-{cid}"]
            res[f"client-{cid}"] = reply.q_a_prob
            group = "forget" if cid in departed else "retain"
            groups[group].append((reply.q_a_prob, reply.num_examples))
        if not groups["forget"] and not groups["retain"]:
            raise PipelineError(
                f"federated evaluation of {name}: no client answered ({missing})"
            )
        for group, vals in groups.items():
            total = sum(n for _, n in vals)
            res[f"{group}_Q_A_Prob"] = (
                sum(v * n for v, n in vals) / total if total else None
            )
        if missing:
            res["missing"] = missing
        out[name] = res
    return out


def save_adapter(
    cfg: ResolvedConfig, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Save an adapter with peft ``save_pretrained`` (adapter_config + safetensors).

    Parameters
    ----------
    cfg : ResolvedConfig
        Run config (model and LoRA spec).
    state : dict[str, torch.Tensor]
        Adapter tensors.
    path : Path
        Target directory.
    """
    model_dir = resolve_model_dir(cfg.preset, cfg.model_path or None)
    model, _ = load_lora_model(model_dir, cfg.lora_spec())
    set_adapter(model, state)
    model.save_pretrained(str(path))
