"""Experiment runner: Simulation Engine run of the pipeline, evaluation, run.json.

Used by the ``fed-unlearn`` CLI. Training and unlearning go through Flower's
Simulation Engine (``run_simulation``, one client at a time on 2 cores); the
evaluation of the saved adapters runs in this process on the simulation's data
(the researcher's harness: in a simulation all data is local anyway).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fed_unlearn import numerics
from fed_unlearn.config import AnyConfig, ResolvedConfig, RunConfig, resolve
from fed_unlearn.journal import UNLEARN_LOG, UnlearnJournal
from fed_unlearn.methods import Requirement, get_method
from fed_unlearn.types import AdapterState

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "forget_quality",
    "model_utility",
)


class RunError(RuntimeError):
    """A run failed; the message is one readable line."""


def versions() -> dict[str, str]:
    """Versions of Python and the packages that determine results."""
    out = {"python": platform.python_version()}
    for pkg in (
        "fed-unlearn",
        "torch",
        "transformers",
        "peft",
        "flwr",
        "numpy",
        "scipy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_sha() -> str:
    """Commit of the code that ran (``unknown`` outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        sha = proc.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except OSError:
        return "unknown"


def needs_flower(
    cfg: AnyConfig, steps: tuple[str, ...], federation: Path | None = None
) -> bool:
    """Whether the pipeline must start the Simulation Engine (something not cached)."""
    from server.pipeline import (
        departure_plan,
        history_key,
        load_federation,
        load_phase,
    )

    if federation is not None:
        fed = load_federation(federation, history_key(cfg))
        excluded = departure_plan(cfg, fed.history)[2]
    else:
        if load_phase(cfg, ()) is None:
            return True
        excluded = cfg.departed()
    if "unlearn" not in steps:
        return False
    if load_phase(cfg, excluded) is None:
        return True
    r = resolve(cfg)  # the method's options with the base model's defaults
    reqs = get_method(r.method, r.method_options).needs()
    return bool(reqs & {Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})


def simulate(
    cfg: AnyConfig,
    steps: tuple[str, ...],
    progress: bool = True,
    client_app: Any = None,
    federation: Path | None = None,
    journal: UnlearnJournal | None = None,
) -> Any:
    """Run the pipeline on Flower's Simulation Engine (or from cache).

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        Validated configuration (resolved here if it is not yet).
    steps : tuple[str, ...]
        Pipeline steps.
    progress : bool
        Show a progress bar of rounds.
    client_app : flwr.clientapp.ClientApp, optional
        ClientApp to simulate (default: :data:`clients.client_app.app`).
    federation : Path, optional
        A saved federation to depart from (see ``server.pipeline.run_pipeline``).
    journal : UnlearnJournal, optional
        The run's per-round unlearning log (see ``server.pipeline.run_pipeline``).

    Returns
    -------
    server.pipeline.PipelineOutput
        Adapters and costs.
    """
    from server.pipeline import run_pipeline

    cfg = resolve(cfg)
    bar = _RoundBar(cfg, steps) if progress else None
    if not needs_flower(cfg, steps, federation):
        log.info("all FL phases are cached; running the pipeline without Flower")
        return run_pipeline(None, cfg, steps, federation=federation, journal=journal)
    from flwr.simulation import run_simulation

    _quiet_run_simulation_notice()
    from clients.client_app import app as default_client_app
    from server.server_app import make_server_app

    client_app = client_app or default_client_app

    state: dict[str, Any] = {}
    server_app = make_server_app(
        cfg,
        steps,
        state,
        bar.update if bar else None,
        federation=federation,
        journal=journal,
    )
    backend_config: dict[str, Any] = {
        # One client at a time on a 2-core machine (Flower #1814/#3463).
        "client_resources": {"num_cpus": max(1, os.cpu_count() or 1), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, os.cpu_count() or 1),
            "num_gpus": 0,
            "logging_level": 30,
        },
    }
    try:
        if bar:
            bar.start()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_name="ray",
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    finally:
        if bar:
            bar.stop()
    if "error" in state:
        log.debug(state.get("traceback", ""))
        exc = state["error"]
        raise RunError(f"{type(exc).__name__}: {exc}") from exc
    if "output" not in state:
        raise RunError(
            "the Flower simulation ended without a result (see the log above)"
        )
    return state["output"]


class _RunSimulationNotice(logging.Filter):
    """Drop flwr 1.42's deprecation warning of ``run_simulation`` (to debug).

    It tells the user to run ``flwr run`` instead, which is not what a
    ``fed-unlearn`` user does: the runner needs ``run_simulation`` to start a
    ServerApp object in this process (docs/usage.md says what happens when Flower
    removes it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "`run_simulation` function is deprecated" in record.getMessage():
            log.debug("flwr: %s", record.getMessage().splitlines()[0])
            return False
        return True


def _quiet_run_simulation_notice() -> None:
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _RunSimulationNotice) for f in flwr_log.filters):
        flwr_log.addFilter(_RunSimulationNotice())


class _RoundBar:
    """Rich progress bar of FL rounds per phase (fed from the ServerApp thread)."""

    def __init__(self, cfg: ResolvedConfig, steps: tuple[str, ...]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.rounds = int(cfg.num_server_rounds)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        self.tasks: dict[str, Any] = {}

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, phase: str, server_round: int, info: dict[str, Any]) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(
                f"{phase} rounds", total=self.rounds, info=""
            )
        loss = info.get("train-loss")
        text = f"loss {loss:.3f}" if isinstance(loss, float) else ""
        if info.get("rejected"):
            text += f" rejected {sorted(info['rejected'])}"
        self.progress.update(self.tasks[phase], completed=server_round, info=text)


def eval_splits(cfg: ResolvedConfig) -> Any:
    """Return the run's evaluation splits (each capped at ``eval-max-items``).

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (data and departed clients).

    Returns
    -------
    fed_unlearn.metrics.EvalSplits
        Forget (the departed clients' items), retain, holdout and general.
    """
    from clients.task import dataset
    from fed_unlearn.metrics import EvalSplits, spread_items

    data, departed, cap = dataset(cfg), cfg.departed(), cfg.eval_max_items
    return EvalSplits(
        forget=spread_items(data.forget_items(departed), cap),
        retain=spread_items(data.retain_items(departed), cap),
        holdout=spread_items(list(data.holdout), cap),
        general=spread_items(list(data.general), cap),
    )


def eval_options(cfg: ResolvedConfig) -> dict[str, Any]:
    """Return the run's keyword arguments of :func:`fed_unlearn.metrics.evaluate`."""
    return {
        "batch_size": cfg.eval_batch_size,
        "max_new_tokens": int(cfg.eval_max_new_tokens),
        "max_length": int(cfg.max_length),
        "gradnorm": cfg.eval_gradnorm,
    }


def evaluate_adapters(
    cfg: ResolvedConfig,
    adapters: dict[str, AdapterState],
    reference_name: str = "retrain",
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Evaluate several adapters on the run's splits (retrain first: the reference).

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (model, data, depart).
    adapters : dict[str, AdapterState]
        Name -> adapter (``original``, ``unlearned``, ``retrain``).
    reference_name : str
        Which adapter is the retrain oracle.

    Returns
    -------
    dict[str, tuple[dict, dict]]
        Name -> ``(TOFU_EVAL, TOFU_SUMMARY)``.
    """
    from fed_unlearn.metrics import evaluate
    from fed_unlearn.models import (
        load_lora_model,
        prompt_formatter,
        resolve_model_dir,
        set_adapter,
    )

    splits = eval_splits(cfg)
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    order = sorted(adapters, key=lambda n: n != reference_name)
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name in order:
        same = next((o for o in results if _same(adapters[o], adapters[name])), None)
        if same is not None and same != reference_name:
            results[name] = results[same]  # identical adapter (e.g. method `none`)
            continue
        set_adapter(model, adapters[name])
        reference = (
            results[reference_name][0]
            if name != reference_name and reference_name in results
            else None
        )
        results[name] = evaluate(
            model, tok, prompt_fn, splits, reference, **eval_options(cfg)
        )
    return results


def attribution_adapters(
    cfg: ResolvedConfig, adapters: dict[str, AdapterState]
) -> dict[str, Any]:
    """Measure the MLP-neuron attribution of each adapter on the forget split.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (``eval-attribution-tau``, ``max-length``,
        ``eval-batch-size``, the evaluation's forget split).
    adapters : dict[str, AdapterState]
        ``original``, ``unlearned`` and ``retrain``.

    Returns
    -------
    dict[str, Any]
        :func:`fed_unlearn.metrics.attribution.neuron_summary` of them.
    """
    from fed_unlearn.metrics.attribution import measure_attribution
    from fed_unlearn.models import load_lora_model, prompt_formatter, resolve_model_dir

    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    return measure_attribution(
        model,
        tok,
        prompt_formatter(tok),
        eval_splits(cfg).forget,
        adapters,
        tau=cfg.eval_attribution_tau,
        max_length=int(cfg.max_length),
        batch_size=int(cfg.eval_batch_size),
    )


def _same(a: AdapterState, b: AdapterState) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def client_compute(stats: dict[str, Any]) -> dict[str, float]:
    """Sum the clients' local work over an FL phase's rounds.

    Parameters
    ----------
    stats : dict[str, Any]
        A phase's stats (``round_log`` with the aggregated train metrics).

    Returns
    -------
    dict[str, float]
        ``local_steps``, ``tokens`` and ``client_seconds`` summed over rounds.
    """
    log_ = stats.get("round_log", [])
    return {
        "local_steps": float(sum(r.get("local-steps", 0) for r in log_)),
        "tokens": float(sum(r.get("tokens", 0) for r in log_)),
        "client_seconds": float(sum(r.get("train-seconds", 0.0) for r in log_)),
    }


def add_method_wall(run: dict[str, Any], out: Any) -> None:
    """Put each phase's wall time without the per-round curve evaluation in ``run``.

    The simulations evaluate the forget/retain curve after every round (FL phases
    and unlearning rounds alike); that is a measurement, which a deployment does
    not run, so cost ratios compare ``wall_time_s.excl_curve_eval``. Phases cached
    before the evaluation was timed have no entry.

    Parameters
    ----------
    run : dict[str, Any]
        ``run.json`` being built (``wall_time_s`` filled; changed in place).
    out : PipelineOutput
        The pipeline's phases and unlearning stats.
    """
    walls = run["wall_time_s"]
    spent: dict[str, float | None] = {
        "train": out.train.stats.get("curve_eval_s"),
        "retrain": out.retrain.stats.get("curve_eval_s") if out.retrain else None,
    }
    if "unlearn" in walls:
        info = (out.unlearn_stats or {}).get("info", {})
        spent["unlearn"] = (
            spent["retrain"]
            if (out.unlearn_stats or {}).get("is_oracle")
            else info.get("eval_seconds")
        )
    walls["curve_eval"] = spent
    walls["excl_curve_eval"] = {
        k: walls[k] - v for k, v in spent.items() if v is not None and k in walls
    }


def add_oracle_cost(run: dict[str, Any], oracle_stopped: bool) -> None:
    """Flag an oracle-stopped run and charge it the oracle's cost (in place).

    A method run with ``stop="oracle"`` consumed the retrain oracle, so its
    unlearning wall time (with and without the curve evaluation) and bytes
    include the retrain phase's; the method's own cost stays in
    ``*.unlearn_method_only``.
    """
    run["oracle_stopped"] = oracle_stopped
    if not oracle_stopped or "retrain" not in run["wall_time_s"]:
        return
    walls, by = run["wall_time_s"], run["bytes"]
    walls["unlearn_method_only"] = walls["unlearn"]
    walls["unlearn"] += walls["retrain"]
    excl = walls.get("excl_curve_eval") or {}
    if "unlearn" in excl and "retrain" in excl:
        excl["unlearn_method_only"] = excl["unlearn"]
        excl["unlearn"] += excl["retrain"]
    by["unlearn_method_only"] = dict(by["unlearn"])
    by["unlearn"] = {k: by["unlearn"][k] + by["retrain"][k] for k in by["unlearn"]}


T2F_DEFINITION = (
    "first unlearning round whose forget_Q_A_Prob (per-round subset) stays within "
    "delta = 10% of the |original - retrain| gap of the retrain oracle's final value "
    "for 3 rounds (or all remaining rounds); null = never"
)


def add_unlearning_curve(
    run: dict[str, Any], is_oracle: bool, info: dict[str, Any]
) -> None:
    """Put the unlearning curve and T2F into ``run`` (in place).

    The curve is the method's own per-round log (``info["curve"]``), the retrain
    phase's curve for ``retrain``, and a single point (round 0, the trained model)
    for methods without rounds. T2F follows :data:`T2F_DEFINITION`.

    Parameters
    ----------
    run : dict[str, Any]
        The run record (needs ``curves.train`` and ``curves.retrain``).
    is_oracle : bool
        Whether the method's result is the retrain oracle (its curve is then
        the oracle's).
    info : dict[str, Any]
        The method's ``UnlearnResult.info``.
    """
    from fed_unlearn.metrics import time_to_forget
    from fed_unlearn.metrics.quick import t2f_delta

    train, retrain = run["curves"].get("train", []), run["curves"].get("retrain", [])
    if is_oracle:
        curve = retrain
    elif info.get("curve"):
        curve = list(info["curve"])
    else:
        curve = [{**train[-1], "round": 0}] if train else []
    run["curves"]["unlearn"] = curve
    run["T2F_definition"] = T2F_DEFINITION
    if not (curve and train and retrain):
        run["T2F"] = None
        return
    oracle = retrain[-1]["forget_Q_A_Prob"]
    delta = t2f_delta(train[-1]["forget_Q_A_Prob"], oracle)
    values = [p["forget_Q_A_Prob"] for p in curve if p["round"] > 0]
    t2f = time_to_forget(values, oracle, delta) if values else None
    run["T2F"] = t2f


def write_evals(
    out_dir: Path, results: dict[str, tuple[dict[str, Any], dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Write ``evals/<model>/TOFU_*.json`` and the unlearned model's top-level files.

    Parameters
    ----------
    out_dir : Path
        Run directory.
    results : dict[str, tuple[dict, dict]]
        Output of :func:`evaluate_adapters`.

    Returns
    -------
    dict[str, dict[str, Any]]
        The ``summary`` block of ``run.json`` (:data:`SUMMARY_COLUMNS` per model).
    """
    for name, (ev, summ) in results.items():
        write_json(out_dir / "evals" / name / "TOFU_EVAL.json", ev)
        write_json(out_dir / "evals" / name / "TOFU_SUMMARY.json", summ)
    write_json(out_dir / "TOFU_EVAL.json", results["unlearned"][0])
    write_json(out_dir / "TOFU_SUMMARY.json", results["unlearned"][1])
    return {
        name: {k: summ.get(k) for k in SUMMARY_COLUMNS}
        for name, (_, summ) in results.items()
    }


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def run_all(
    cfg: AnyConfig,
    out_dir: Path,
    steps: tuple[str, ...] = ("train", "unlearn"),
    do_eval: bool = True,
    progress: bool = True,
    federation: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the main job: FL, departure, unlearning, retrain oracle, evaluation.

    A run that unlearns keeps its per-round unlearning log in
    ``out_dir/unlearn-log`` (:mod:`fed_unlearn.journal`), headed by what
    ``fed-unlearn resume`` needs to run the same command again.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        Validated configuration (resolved here if it is not yet).
    out_dir : Path
        Run directory (must not already hold a run).
    steps : tuple[str, ...]
        ``("train",)`` for ``fed-unlearn train``.
    do_eval : bool
        Evaluate after unlearning.
    progress : bool
        Progress bars.
    federation : Path, optional
        Depart from this saved federation instead of training (``fed-unlearn
        forget``); without it, ``fed-unlearn train`` saves one in the run.
    resume : bool
        Go on from the unlearning log in ``out_dir`` (``fed-unlearn resume``)
        instead of starting a fresh one.

    Returns
    -------
    dict[str, Any]
        The ``run.json`` content.
    """
    from server.pipeline import save_federation
    from server.server_app import write_outputs

    cfg = resolve(cfg)
    if cfg.sequential and "unlearn" in steps:
        if federation is not None:
            raise RunError(
                "sequential = true departs from a fresh federation; a saved one "
                "takes one request per `fed-unlearn forget`"
            )
        return run_sequential(cfg, out_dir, do_eval, progress)
    t0 = time.perf_counter()
    journal = None
    fresh_dir = not out_dir.exists()
    if "unlearn" in steps:
        journal = UnlearnJournal(out_dir / UNLEARN_LOG)
        if not resume:
            journal.start(
                {
                    "command": " ".join(sys.argv),
                    "config": cfg.to_flat(),
                    "steps": list(steps),
                    "do_eval": do_eval,
                    "federation": str(federation) if federation else None,
                    "resume_refusal": get_method(
                        cfg.method, resolve(cfg).method_options
                    ).resume_refusal(),
                }
            )
    try:
        out = simulate(cfg, steps, progress, federation=federation, journal=journal)
    except Exception:
        # a run that fails before its first unlearning round is logged leaves
        # nothing behind (a later failure keeps the log for `fed-unlearn resume`)
        if fresh_dir and (journal is None or not journal.rounds()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if steps == ("train",):
        save_federation(out.train, out_dir)
    before = out.train.history.forgotten() if federation is not None else []
    write_outputs(out, out_dir)
    run: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "config": cfg.to_flat(),
        "seeds": {
            "seed": cfg.seed,
            "lora_init": cfg.seed,
            "data": cfg.seed,
            "local_order": "derive_seed(seed, round, client)",
        },
        "versions": versions(),
        "numerics": numerics.describe(),
        **(
            {
                "federation": str(federation),
                "forgotten_before": before,
                "forgotten": out.train.history.forgotten(),
            }
            if federation is not None
            else {}
        ),
        "git_sha": git_sha(),
        "departed": list(cfg.departed()),
        "remaining": [c for c in cfg.remaining() if c not in before],
        "history": {
            "path": str(out.train.path / "history"),
            "bytes_per_round": out.train.stats["history_bytes_per_round"],
        },
        "cached": {
            "train": out.train.cached,
            "retrain": out.retrain.cached if out.retrain else None,
        },
        "wall_time_s": {"train": out.train.stats["wall_time_s"]},
        "bytes": {"train": out.train.stats["bytes"]},
        "rounds": {"train": out.train.stats["rounds"]},
    }
    if out.retrain is not None:
        run["wall_time_s"]["retrain"] = out.retrain.stats["wall_time_s"]
        run["bytes"]["retrain"] = out.retrain.stats["bytes"]
        run["rounds"]["retrain"] = out.retrain.stats["rounds"]
    run["client_compute"] = {"train": client_compute(out.train.stats)}
    if out.retrain is not None:
        run["client_compute"]["retrain"] = client_compute(out.retrain.stats)
    run["curves"] = {"train": out.train.stats.get("curve", [])}
    # what each curve was measured on (server.pipeline.curve_data): "clients'"
    # (the data set the clients train on) or "none" (no curve: e.g. clients
    # read node-local data the server does not hold)
    run["curve_data"] = {"train": out.train.stats.get("curve_data", "unrecorded")}
    if out.retrain is not None:
        run["curves"]["retrain"] = out.retrain.stats.get("curve", [])
        run["curve_data"]["retrain"] = out.retrain.stats.get("curve_data", "unrecorded")
    if out.unlearned is not None:
        info = out.unlearn_stats.get("info", {})
        is_oracle = bool(out.unlearn_stats.get("is_oracle"))
        add_unlearning_curve(run, is_oracle, info)
        run["curve_data"]["unlearn"] = (
            run["curve_data"].get("retrain", "none")
            if is_oracle  # its curve is the retrain phase's
            else out.unlearn_stats.get("curve_data", "none")
        )
        if is_oracle and out.retrain is not None:
            run["client_compute"]["unlearn"] = client_compute(out.retrain.stats)
        else:
            zero = {"local_steps": 0.0, "tokens": 0.0, "client_seconds": 0.0}
            run["client_compute"]["unlearn"] = info.get("client_compute", zero)
        run["method"] = cfg.method
        run["wall_time_s"]["unlearn"] = out.unlearn_stats["wall_time_s"]
        run["bytes"]["unlearn"] = out.unlearn_stats["bytes"]
        run["rounds"]["unlearn"] = out.unlearn_stats["rounds"]
        run["unlearn_info"] = out.unlearn_stats["info"]
    add_method_wall(run, out)
    if out.unlearned is not None:
        add_oracle_cost(run, bool(out.unlearn_stats.get("oracle_stopped")))
    if do_eval and out.unlearned is not None and out.retrain is not None:
        te = time.perf_counter()
        results = evaluate_adapters(
            cfg,
            {
                "original": out.train.final,
                "unlearned": out.unlearned,
                "retrain": out.retrain.final,
            },
        )
        run["summary"] = write_evals(out_dir, results)
        run["wall_time_s"]["eval"] = time.perf_counter() - te
        if cfg.eval_relearn_steps or cfg.eval_relearn_benign_rounds:
            from simulations.audit import RELEARN_JSON, put_in_run, relearn_audit

            tr = time.perf_counter()
            audit = relearn_audit(
                cfg,
                {
                    "original": out.train.final,
                    "retrain": out.retrain.final,
                    "unlearned": out.unlearned,
                },
                steps=cfg.eval_relearn_steps,
                rounds=cfg.eval_relearn_benign_rounds,
                remaining=run["remaining"],
            )
            put_in_run(run, audit)
            write_json(out_dir / RELEARN_JSON, audit)
            run["wall_time_s"]["relearn"] = time.perf_counter() - tr
        if cfg.eval_attribution:
            ta = time.perf_counter()
            run["attribution"] = attribution_adapters(
                cfg,
                {
                    "original": out.train.final,
                    "unlearned": out.unlearned,
                    "retrain": out.retrain.final,
                },
            )
            run["wall_time_s"]["attribution"] = time.perf_counter() - ta
    run["wall_time_s"]["total"] = time.perf_counter() - t0
    write_json(out_dir / "run.json", run)
    return run


# ------------------------------------------------------------ sequential runs
#: Per request, the ``run.json`` figures of the unlearned model and its oracle.
REQUEST_COLUMNS = (
    "forget_Q_A_Prob",
    "forget_quality",
    "retain_Q_A_Prob",
    "model_utility",
)


def with_depart(cfg: ResolvedConfig, clients: tuple[int, ...]) -> ResolvedConfig:
    """Return ``cfg`` with ``depart`` set to ``clients`` (one non-sequential run).

    Parameters
    ----------
    cfg : ResolvedConfig
        The run's configuration.
    clients : tuple[int, ...]
        The departed clients of the derived run.

    Returns
    -------
    ResolvedConfig
        The same run as given, with that departure and ``sequential`` off.
    """
    flat = {**cfg.given_flat(), "depart": ",".join(map(str, clients))}
    flat["sequential"] = False
    return RunConfig.from_flat(flat).resolved()


def request_forget_prob(
    cfg: ResolvedConfig, adapters: dict[str, AdapterState], client: int
) -> dict[str, float]:
    """Mean answer probability of each adapter on one client's forget items.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (data, model, ``eval-max-items``).
    adapters : dict[str, AdapterState]
        Name -> adapter.
    client : int
        The request's client.

    Returns
    -------
    dict[str, float]
        Name -> :func:`fed_unlearn.metrics.quick.answer_prob` (the definition of
        ``forget_Q_A_Prob``) on that client's items, up to ``eval-max-items``.
    """
    from clients.task import dataset
    from fed_unlearn.metrics import spread_items
    from fed_unlearn.metrics.quick import answer_prob
    from fed_unlearn.models import (
        load_lora_model,
        prompt_formatter,
        resolve_model_dir,
        set_adapter,
    )

    items = spread_items(dataset(cfg).forget_items((client,)), cfg.eval_max_items)
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    out = {}
    for name, state in adapters.items():
        set_adapter(model, state)
        out[name] = answer_prob(
            model, tok, prompt_fn, items, int(cfg.max_length), cfg.eval_batch_size
        )
    return out


def run_sequential(
    cfg: ResolvedConfig, out_dir: Path, do_eval: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Serve the clients of ``depart`` as requests one after another.

    The FL run is kept as a federation in ``out_dir/federation`` (as
    ``fed-unlearn train`` does); request j is then ``fed-unlearn forget`` of
    its client from that federation: it starts from request j-1's unlearned
    adapter, the ledger records it, and its oracle is the retrain without
    every client departed so far (``server.pipeline.departure_plan``). Each
    request's outputs go to ``out_dir/requests/<j>-client<c>/``. Evaluated
    per request (a measurement): on the forget set of all clients departed so
    far and the retain set of the rest, the unlearned model and that step's
    oracle (:data:`REQUEST_COLUMNS`), and both models' ``forget_Q_A_Prob`` on
    the request's own forget set. The top-level ``summary`` is the last
    request's, with the trained model as ``original``; costs are summed over
    the requests, the oracle's too (a sequential retrain retrains per request).

    Parameters
    ----------
    cfg : ResolvedConfig
        Configuration with ``sequential`` on.
    out_dir : Path
        Run directory.
    do_eval : bool
        Evaluate every request.
    progress : bool
        Progress bars.

    Returns
    -------
    dict[str, Any]
        The ``run.json`` content; ``sequential`` holds the requests.
    """
    from server.pipeline import save_federation
    from server.server_app import write_outputs

    t0 = time.perf_counter()
    order = cfg.depart_order()
    trained = simulate(with_depart(cfg, order), ("train",), progress)
    fed = save_federation(trained.train, out_dir)
    walls = {
        "train": trained.train.stats["wall_time_s"],
        "unlearn": 0.0,
        "retrain": 0.0,
    }
    excl = {"unlearn": 0.0, "retrain": 0.0}
    nbytes: dict[str, dict[str, float]] = {
        "train": trained.train.stats["bytes"],
        "unlearn": {"down": 0, "up": 0, "total": 0},
        "retrain": {"down": 0, "up": 0, "total": 0},
    }
    rounds = {"train": trained.train.stats["rounds"], "unlearn": 0, "retrain": 0}
    compute = {"train": client_compute(trained.train.stats)}
    zero = {"local_steps": 0.0, "tokens": 0.0, "client_seconds": 0.0}
    compute["unlearn"], compute["retrain"] = dict(zero), dict(zero)
    requests: list[dict[str, Any]] = []
    run: dict[str, Any] = {}
    oracle_stopped = False
    out = None
    for j, client in enumerate(order, 1):
        step_cfg = with_depart(cfg, (client,))
        out = simulate(step_cfg, ("train", "unlearn"), progress, federation=fed)
        assert out.unlearned is not None and out.retrain is not None
        step_dir = out_dir / "requests" / f"{j:02d}-client{client}"
        write_outputs(out, step_dir)  # records the request in the ledger
        stats = out.unlearn_stats
        step = {
            "wall_time_s": {
                "train": 0.0,
                "retrain": out.retrain.stats["wall_time_s"],
                "unlearn": stats["wall_time_s"],
            },
            "bytes": {"retrain": out.retrain.stats["bytes"], "unlearn": stats["bytes"]},
        }
        add_method_wall(step, out)
        add_oracle_cost(step, bool(stats.get("oracle_stopped")))
        oracle_stopped |= bool(stats.get("oracle_stopped"))
        for phase in ("unlearn", "retrain"):
            walls[phase] += step["wall_time_s"][phase]
            excl[phase] += step["wall_time_s"]["excl_curve_eval"].get(
                phase, step["wall_time_s"][phase]
            )
            for k in nbytes[phase]:
                nbytes[phase][k] += step["bytes"][phase][k]
        rounds["unlearn"] += stats["rounds"]
        rounds["retrain"] += out.retrain.stats["rounds"]
        info = stats.get("info", {})
        if stats.get("is_oracle"):
            spent = client_compute(out.retrain.stats)
        else:
            spent = info.get("client_compute", zero)
        for k in zero:
            compute["unlearn"][k] += spent[k]
            compute["retrain"][k] += client_compute(out.retrain.stats)[k]
        record: dict[str, Any] = {
            "request": j,
            "client": client,
            "forgotten": list(order[:j]),
            "dir": str(step_dir),
            "rounds": stats["rounds"],
            "wall_time_s": stats["wall_time_s"],
            "bytes": stats["bytes"],
            "info": info,
        }
        if do_eval:
            so_far = with_depart(cfg, order[:j])
            adapters = {"unlearned": out.unlearned, "retrain": out.retrain.final}
            if j == len(order):
                adapters["original"] = trained.train.final
            results = evaluate_adapters(so_far, adapters)
            own = request_forget_prob(
                so_far,
                {"unlearned": out.unlearned, "retrain": out.retrain.final},
                client,
            )
            for name, key in (("unlearned", "unlearned"), ("retrain", "oracle")):
                summ = results[name][1]
                record[key] = {c: summ.get(c) for c in REQUEST_COLUMNS}
                record[key]["request_forget_Q_A_Prob"] = own[name]
            if j == len(order):
                run["summary"] = write_evals(out_dir, results)
        requests.append(record)
        log.info("sequential request %d/%d (client %d) done", j, len(order), client)
    assert out is not None and out.retrain is not None
    # the whole sequence: from the trained adapter to the last request's
    write_outputs(
        dataclasses.replace(
            out, cfg=with_depart(cfg, order), train=trained.train, federation=None
        ),
        out_dir,
    )
    walls["excl_curve_eval"] = {
        "train": walls["train"] - (trained.train.stats.get("curve_eval_s") or 0.0),
        **excl,
    }
    run = {
        "command": " ".join(sys.argv),
        "config": cfg.to_flat(),
        "seeds": {
            "seed": cfg.seed,
            "lora_init": cfg.seed,
            "data": cfg.seed,
            "local_order": "derive_seed(seed, round, client)",
        },
        "versions": versions(),
        "numerics": numerics.describe(),
        "git_sha": git_sha(),
        "federation": str(fed),
        "forgotten": out.train.history.forgotten(),
        "departed": list(order),
        "remaining": list(cfg.remaining()),
        "history": {
            "path": str(fed / "history"),
            "bytes_per_round": trained.train.stats["history_bytes_per_round"],
        },
        "cached": {"train": trained.train.cached, "retrain": out.retrain.cached},
        "wall_time_s": walls,
        "bytes": nbytes,
        "rounds": rounds,
        "client_compute": compute,
        "curves": {
            "train": trained.train.stats.get("curve", []),
            "retrain": out.retrain.stats.get("curve", []),
        },
        "method": cfg.method,
        "unlearn_info": out.unlearn_stats["info"],
        "sequential": requests,
        **run,
    }
    add_unlearning_curve(
        run, bool(out.unlearn_stats.get("is_oracle")), out.unlearn_stats["info"]
    )
    run["oracle_stopped"] = oracle_stopped
    run["wall_time_s"]["total"] = time.perf_counter() - t0
    write_json(out_dir / "run.json", run)
    return run
