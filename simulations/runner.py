"""Experiment runner: Simulation Engine run of the pipeline, evaluation, run.json.

Used by the ``fed-unlearn`` CLI. Training and unlearning go through Flower's
Simulation Engine (``run_simulation``, one client at a time on 2 cores); the
evaluation of the saved adapters runs in this process on the simulation's data
(the researcher's harness: in a simulation all data is local anyway).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fed_unlearn import seeds
from fed_unlearn.config import AnyConfig, ResolvedConfig, resolve
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
    reqs = get_method(cfg.method, cfg.method_options).needs()
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


def relearn_adapters(
    cfg: ResolvedConfig, adapters: dict[str, AdapterState]
) -> dict[str, Any]:
    """Run the relearning attack (:mod:`fed_unlearn.metrics.relearn`) on each adapter.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (``eval-relearn-steps`` > 0, ``eval-relearn-fraction``,
        ``eval-relearn-lr``; the attack uses the run's batch size and length).
    adapters : dict[str, AdapterState]
        ``original``, ``retrain`` and ``unlearned``.

    Returns
    -------
    dict[str, Any]
        ``spec`` (the attack's settings and item counts), ``curves`` (name ->
        probe ``forget_Q_A_Prob`` per attack step), ``final`` (name -> last
        value) and ``relearn_gap`` of the unlearned adapter.
    """
    from clients.task import dataset
    from fed_unlearn.metrics.relearn import (
        RelearnSpec,
        relearn_curve,
        relearn_gap,
        split_attack,
    )
    from fed_unlearn.models import load_lora_model, prompt_formatter, resolve_model_dir
    from fed_unlearn.training import derive_seed

    attack, probes = split_attack(
        dataset(cfg).forget_items(cfg.departed()), cfg.eval_relearn_fraction
    )
    spec = RelearnSpec(
        steps=cfg.eval_relearn_steps,
        fraction=cfg.eval_relearn_fraction,
        lr=cfg.relearn_lr(),
        batch_size=int(cfg.batch_size),
        max_length=int(cfg.max_length),
        seed=derive_seed(cfg.seed, seeds.RELEARN),
    )
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    curves: dict[str, list[dict[str, float]]] = {}
    for name, state in adapters.items():
        same = next((o for o in curves if _same(adapters[o], state)), None)
        curves[name] = (
            curves[same]  # identical adapter (method none): same attack, same curve
            if same is not None
            else relearn_curve(model, tok, prompt_fn, state, attack, probes, spec)
        )
    final = {name: c[-1]["forget_Q_A_Prob"] for name, c in curves.items()}
    return {
        "spec": {
            "steps": spec.steps,
            "fraction": spec.fraction,
            "lr": spec.lr,
            "batch_size": spec.batch_size,
            "attack_items": len(attack),
            "probe_items": len(probes),
        },
        "curves": curves,
        "final": final,
        "relearn_gap": relearn_gap(curves),
    }


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
    t0 = time.perf_counter()
    journal = None
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
                        cfg.method, cfg.method_options
                    ).resume_refusal(),
                }
            )
    out = simulate(cfg, steps, progress, federation=federation, journal=journal)
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
    if out.retrain is not None:
        run["curves"]["retrain"] = out.retrain.stats.get("curve", [])
    if out.unlearned is not None:
        info = out.unlearn_stats.get("info", {})
        is_oracle = bool(out.unlearn_stats.get("is_oracle"))
        add_unlearning_curve(run, is_oracle, info)
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
        if cfg.eval_relearn_steps:
            tr = time.perf_counter()
            run["relearn"] = relearn_adapters(
                cfg,
                {
                    "original": out.train.final,
                    "retrain": out.retrain.final,
                    "unlearned": out.unlearned,
                },
            )
            write_json(out_dir / "RELEARN.json", run["relearn"])
            run["wall_time_s"]["relearn"] = time.perf_counter() - tr
    run["wall_time_s"]["total"] = time.perf_counter() - t0
    write_json(out_dir / "run.json", run)
    return run
