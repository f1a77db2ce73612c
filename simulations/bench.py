"""``fed-unlearn bench SUITE --out DIR``: methods x scenarios x seeds, with CIs.

A suite is a TOML file in ``simulations/suites/`` (or any path)::

    description = "what it measures"
    seeds = [1, 2]                 # evaluation seeds
    purpose = "evaluation"         # or "calibration": seeds no evaluation uses

    [defaults]                     # flat run-config keys of every scenario
    preset = "tiny"

    [[scenario]]
    name = "tiny-3c"
    departs = 1                    # how many clients depart (the seed picks them)
    num-clients = 3                # more flat run-config keys
    methods = ["foul_server"]      # optional: only these method labels here

    [[method]]
    name = "foul_server"
    label = "foul_server"          # optional; default: the name
    options = { kappa = 0.75 }     # optional method options (--opt)

A seed changes the data, the LoRA init, the data order and which clients
depart (:func:`departing_clients`). Each cell (scenario, seed, method) is one
``run_all`` into ``DIR/<scenario>/seed-<s>/<label>/``; FL phases come from the
cache by config hash, so the methods of one (scenario, seed) share them, and a
cell whose ``run.json`` exists is skipped (the bench is resumable; a cell
left half-written is run again).

Per cell, from ``run.json`` (unlearned model against the retrain oracle of the
same cell): ``gap_closed`` = (original - unlearned) / (original - retrain) on
``forget_Q_A_Prob``; ``forget_quality``; ``utility_ratio`` = model_utility /
retrain's; ``privleak``; ``relearn_gap`` (with ``eval-relearn-steps``);
the relearning audit's recovery ratios (:mod:`fed_unlearn.metrics.relearn`)
of the unlearned model and, as their floor, of the retrain oracle under the
same attack: ``relearn_adv_recovery`` / ``relearn_adv_floor`` (with
``eval-relearn-steps``) and ``relearn_benign_recovery`` /
``relearn_benign_floor`` (with ``eval-relearn-benign-rounds``: that many more
FL rounds of the remaining clients; their columns show only in suites that
measure them);
``turned_negative`` and ``negative_share`` of the unlearned model's neuron
attribution (with ``eval-attribution``, :mod:`fed_unlearn.metrics.attribution`);
``wall_ratio`` and ``bytes_ratio`` = the method's wall time (without the
simulation's per-round curve evaluation) and bytes over the retrain's, counting
the oracle for an oracle-stopped run. Aggregated per (scenario, method) as the
mean and a 95 % Student-t confidence interval over seeds. A scenario with
``sequential = true`` serves its departing clients as requests one after
another (``simulations.runner.run_sequential``); its cells also give, per
request j, model_utility, forget_Q_A_Prob (of that request's forget set and of
all forgotten so far) and those of the step-j retrain oracle, aggregated over
seeds per request and plotted as utility against requests. Writes
``results.json``, ``report.md`` and PNG plots (bars with error bars, and the
forgetting curve against the oracle with the seed spread) into ``DIR``, and
with ``publish`` the whole suite's report into ``docs/results/<suite>/``: cells
finished in ``DIR`` replace their published ones, the others are carried over
(:func:`publish`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_unlearn.config import (
    METHOD_OPTION_PREFIX,
    ConfigError,
    ResolvedConfig,
    RunConfig,
)

SUITES_DIR = Path(__file__).resolve().parent / "suites"
DOCS_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"

#: (key, heading, digits) of the aggregated metrics, in report order.
METRICS: tuple[tuple[str, str, int], ...] = (
    ("gap_closed", "gap closed", 2),
    ("forget_quality", "forget_quality", 3),
    ("utility_ratio", "model_utility × retrain", 2),
    ("privleak", "privleak", 1),
    ("relearn_gap", "relearn gap", 2),
    ("relearn_adv_recovery", "adversarial recovery", 2),
    ("relearn_adv_floor", "adversarial recovery, oracle", 2),
    ("relearn_benign_recovery", "benign recovery", 2),
    ("relearn_benign_floor", "benign recovery, oracle", 2),
    ("turned_negative", "neurons turned negative", 1),
    ("negative_share", "negative attribution share", 3),
    ("wall_ratio", "wall × retrain", 3),
    ("bytes_ratio", "bytes × retrain", 3),
)
#: Metrics whose column a scenario's table shows only when some row has a value.
OPTIONAL_METRICS = frozenset(
    {
        "relearn_adv_recovery",
        "relearn_adv_floor",
        "relearn_benign_recovery",
        "relearn_benign_floor",
    }
)
_SUITE_KEYS = {"description", "seeds", "purpose", "defaults", "scenario", "method"}
_SCENARIO_KEYS = {"name", "departs", "methods"}
_METHOD_KEYS = {"name", "label", "options"}
PURPOSES = ("evaluation", "calibration")


class SuiteError(ValueError):
    """A malformed suite file (the message names the file and the key)."""


@dataclass(frozen=True)
class Scenario:
    """One federation: flat run-config keys and how many clients depart."""

    name: str
    departs: int | str  #: a number of clients, or "domain": one whole domain
    config: dict[str, Any]
    methods: tuple[str, ...] = ()  #: method labels run here (empty: all)

    def runs(self, m: MethodSpec) -> bool:
        """Whether method row ``m`` runs in this scenario."""
        return not self.methods or m.label in self.methods


@dataclass(frozen=True)
class MethodSpec:
    """One method row: registry name, row label and options."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    name: str
    description: str
    purpose: str
    seeds: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    methods: tuple[MethodSpec, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the bench."""

    scenario: Scenario
    seed: int
    method: MethodSpec
    config: ResolvedConfig

    def path(self, out: Path) -> Path:
        """Run directory of the cell under ``out``."""
        return out / self.scenario.name / f"seed-{self.seed}" / self.method.label


def list_suites() -> list[str]:
    """Names of the suites shipped in ``simulations/suites/``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def _unknown(where: str, keys: Sequence[str], allowed: set[str]) -> None:
    bad = sorted(set(keys) - allowed)
    if bad:
        raise SuiteError(f"{where}: unknown key(s) {bad} (allowed: {sorted(allowed)})")


def load_suite(name: str) -> Suite:
    """Parse and validate a suite (a name in ``simulations/suites/`` or a path).

    Raises
    ------
    SuiteError
        Naming the file and what is wrong, before any run starts.
    """
    path = Path(name)
    if not path.suffix:
        path = SUITES_DIR / f"{name}.toml"
    if not path.is_file():
        raise SuiteError(
            f"no suite {name!r} (known: {', '.join(list_suites())}; or a .toml path)"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not TOML ({exc})") from None
    _unknown(str(path), list(raw), _SUITE_KEYS)
    seeds = raw.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SuiteError(f"{path}: seeds must be a non-empty list of distinct ints")
    purpose = raw.get("purpose", "evaluation")
    if purpose not in PURPOSES:
        raise SuiteError(f"{path}: purpose must be one of {PURPOSES}, got {purpose!r}")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SuiteError(f"{path}: [defaults] must be a table of run-config keys")
    scenarios = []
    for i, sc in enumerate(raw.get("scenario", [])):
        where = f"{path}: scenario #{i + 1}"
        if not isinstance(sc.get("name"), str) or not sc["name"]:
            raise SuiteError(f"{where}: needs a name")
        departs = sc.get("departs", 1)
        if departs != "domain" and (
            not isinstance(departs, int) or isinstance(departs, bool) or departs < 1
        ):
            raise SuiteError(
                f'{where}: departs must be an int >= 1 or "domain", got {departs!r}'
            )
        conf = {**defaults, **{k: v for k, v in sc.items() if k not in _SCENARIO_KEYS}}
        for k in ("depart", "method", "seed", "out-dir"):
            if k in conf:
                raise SuiteError(f"{where}: {k!r} is set by the bench, not the suite")
        only = sc.get("methods", [])
        if not isinstance(only, list) or not all(isinstance(x, str) for x in only):
            raise SuiteError(f"{where}: methods must be a list of method labels")
        scenarios.append(Scenario(sc["name"], departs, conf, tuple(only)))
    methods = []
    for i, m in enumerate(raw.get("method", [])):
        where = f"{path}: method #{i + 1}"
        _unknown(where, list(m), _METHOD_KEYS)
        if not isinstance(m.get("name"), str):
            raise SuiteError(f"{where}: needs a name")
        opts = m.get("options", {})
        if not isinstance(opts, dict):
            raise SuiteError(f"{where}: options must be a table")
        methods.append(MethodSpec(m["name"], m.get("label", m["name"]), dict(opts)))
    if not scenarios or not methods:
        raise SuiteError(f"{path}: needs at least one [[scenario]] and one [[method]]")
    for what, names in (
        ("scenario", [s.name for s in scenarios]),
        ("method label", [m.label for m in methods]),
    ):
        if len(set(names)) != len(names):
            raise SuiteError(f"{path}: {what}s must be unique, got {names}")
    labels = {m.label for m in methods}
    for sc in scenarios:
        bad = sorted(set(sc.methods) - labels)
        if bad:
            raise SuiteError(
                f"{path}: scenario {sc.name} names method labels {bad} that no "
                f"[[method]] has (have: {sorted(labels)})"
            )
    suite = Suite(
        path.stem,
        str(raw.get("description", "")),
        purpose,
        tuple(seeds),
        tuple(scenarios),
        tuple(methods),
    )
    cells(suite)  # every cell's config validates before anything runs
    return suite


def select(
    suite: Suite,
    methods: Sequence[str] = (),
    seeds: Sequence[int] = (),
    scenarios: Sequence[str] = (),
) -> Suite:
    """Return ``suite`` restricted to some method labels, seeds and scenarios.

    An empty selection keeps all.

    Raises
    ------
    SuiteError
        Naming a label or seed the suite does not have.
    """
    labels = [m.label for m in suite.methods]
    names = [sc.name for sc in suite.scenarios]
    for what, want, have in (
        ("method", methods, labels),
        ("seed", seeds, suite.seeds),
        ("scenario", scenarios, names),
    ):
        bad = [x for x in want if x not in have]
        if bad:
            raise SuiteError(
                f"suite {suite.name} has no {what} {bad} (has: {list(have)})"
            )
    return dataclasses.replace(
        suite,
        methods=tuple(m for m in suite.methods if not methods or m.label in methods),
        seeds=tuple(s for s in suite.seeds if not seeds or s in seeds),
        scenarios=tuple(
            sc for sc in suite.scenarios if not scenarios or sc.name in scenarios
        ),
    )


def departing_clients(
    seed: int, num_clients: int, departs: int | str, domains: int = 0
) -> tuple[int, ...]:
    """Return the clients that depart in a cell, drawn from the seed.

    ``departs`` clients, or with ``departs="domain"`` every client of one of
    the ``domains`` domains (:func:`fed_unlearn.data.synthetic.client_domain`).
    """
    rng = random.Random(f"fed_unlearn.bench.depart:{seed}")
    if departs == "domain":
        from fed_unlearn.data.synthetic import client_domain

        if domains < 2:
            raise SuiteError('departs="domain" needs domains >= 2')
        d = rng.randrange(domains)
        return tuple(c for c in range(num_clients) if client_domain(c, domains) == d)
    assert isinstance(departs, int)
    if not 1 <= departs < num_clients:
        raise SuiteError(
            f"departs={departs} needs 1 <= departs < num-clients ({num_clients})"
        )
    return tuple(sorted(rng.sample(range(num_clients), departs)))


def cells(suite: Suite) -> list[Cell]:
    """Every (scenario, seed, method) cell with its validated run config."""
    out = []
    for sc in suite.scenarios:
        for seed in suite.seeds:
            for m in filter(sc.runs, suite.methods):
                try:
                    cfg = _cell_config(sc, seed, m)
                except (ConfigError, ValueError, KeyError) as exc:
                    raise SuiteError(
                        f"suite {suite.name}, scenario {sc.name}, method {m.label}: "
                        f"{exc}"
                    ) from None
                out.append(Cell(sc, seed, m, cfg))
    return out


def _cell_config(sc: Scenario, seed: int, m: MethodSpec) -> ResolvedConfig:
    """Return the validated run config of a cell (method and options too)."""
    from fed_unlearn.methods import get_method

    flat = dict(sc.config)
    base = RunConfig.from_flat(flat)
    gone = departing_clients(seed, base.num_clients, sc.departs, base.domains)
    flat.update(
        seed=seed,
        depart=",".join(map(str, gone)),
        method=m.name,
        **{f"{METHOD_OPTION_PREFIX}{k}": v for k, v in m.options.items()},
    )
    cfg = RunConfig.from_flat(flat)
    get_method(cfg.method, cfg.method_options)
    return cfg.resolved()


def _done(path: Path) -> bool:
    run = path / "run.json"
    if not run.is_file():
        return False
    try:
        return "summary" in json.loads(run.read_text())
    except json.JSONDecodeError:
        return False


def run_suite(
    suite: Suite,
    out: Path,
    run_cell: Callable[[Cell, Path], Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every unfinished cell of ``suite`` into ``out``; aggregate all of them.

    Parameters
    ----------
    suite : Suite
        The parsed suite.
    out : Path
        Bench directory (created; finished cells in it are skipped).
    run_cell : Callable, optional
        ``(cell, run_dir) -> None``; default: the simulation's ``run_all``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict[str, Any]
        The ``results.json`` content.
    """
    if run_cell is None:
        from simulations.runner import run_all

        def run_cell(cell: Cell, path: Path) -> None:
            run_all(cell.config, path, progress=False)

    todo = cells(suite)
    out.mkdir(parents=True, exist_ok=True)
    from rich.progress import Progress

    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"bench {suite.name}", total=len(todo))
        for cell in todo:
            path = cell.path(out)
            if not _done(path):
                if path.exists():
                    shutil.rmtree(path)  # a cell left half-written: run it again
                bar.update(
                    task,
                    description=f"{cell.scenario.name} s{cell.seed} "
                    f"{cell.method.label}",
                )
                run_cell(cell, path)
            bar.advance(task)
    results = aggregate(suite, out)
    write_results(suite, results, out)
    return results


# ------------------------------------------------------------------ aggregation


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def cell_metrics(run_dir: Path) -> dict[str, Any]:
    """Return the bench metrics of a finished run directory (module docstring)."""
    run = json.loads((run_dir / "run.json").read_text())
    summ = run["summary"]
    orig, unl, ret = summ["original"], summ["unlearned"], summ["retrain"]
    full = json.loads(
        (run_dir / "evals" / "unlearned" / "TOFU_SUMMARY.json").read_text()
    )
    gap = orig["forget_Q_A_Prob"] - ret["forget_Q_A_Prob"]
    walls = run.get("wall_time_s", {})
    excl = walls.get("excl_curve_eval") or {}
    if excl.get("unlearn") is not None and excl.get("retrain") is not None:
        wall = _ratio(excl["unlearn"], excl["retrain"])
    else:
        wall = _ratio(walls.get("unlearn"), walls.get("retrain"))
    by = run.get("bytes", {})
    models = (run.get("attribution") or {}).get("models") or {}
    attribution = models.get("unlearned") or {}
    return {
        "gap_closed": (orig["forget_Q_A_Prob"] - unl["forget_Q_A_Prob"]) / gap
        if gap
        else None,
        "forget_quality": unl.get("forget_quality"),
        "utility_ratio": _ratio(unl.get("model_utility"), ret.get("model_utility")),
        "privleak": full.get("privleak"),
        "relearn_gap": (run.get("relearn") or {}).get("relearn_gap"),
        "relearn_adv_recovery": (run.get("relearn") or {}).get("recovery_ratio"),
        "relearn_adv_floor": (run.get("relearn") or {}).get("recovery_ratio_retrain"),
        "relearn_benign_recovery": (run.get("relearn_benign") or {}).get(
            "recovery_ratio"
        ),
        "relearn_benign_floor": (run.get("relearn_benign") or {}).get(
            "recovery_ratio_retrain"
        ),
        "turned_negative": attribution.get("turned_negative"),
        "negative_share": attribution.get("negative_share"),
        "wall_ratio": wall,
        "bytes_ratio": _ratio(
            (by.get("unlearn") or {}).get("total"),
            (by.get("retrain") or {}).get("total"),
        ),
        "oracle_stopped": bool(run.get("oracle_stopped")),
        "git_sha": run.get("git_sha"),
        "departed": run.get("departed"),
        "curve": [
            (p["round"], p["forget_Q_A_Prob"])
            for p in run.get("curves", {}).get("unlearn", [])
        ],
        "oracle_curve_level": (run.get("curves", {}).get("retrain") or [{}])[-1].get(
            "forget_Q_A_Prob"
        ),
        "sequential": sequential_metrics(run),
    }


#: Per-request figures of a sequential cell: (key, where in the request's record).
SEQUENTIAL_METRICS: tuple[tuple[str, str, str], ...] = (
    ("model_utility", "unlearned", "model_utility"),
    ("oracle_model_utility", "oracle", "model_utility"),
    ("forget_Q_A_Prob", "unlearned", "forget_Q_A_Prob"),
    ("oracle_forget_Q_A_Prob", "oracle", "forget_Q_A_Prob"),
    ("request_forget_Q_A_Prob", "unlearned", "request_forget_Q_A_Prob"),
    ("oracle_request_forget_Q_A_Prob", "oracle", "request_forget_Q_A_Prob"),
)


def sequential_metrics(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Return a sequential run's per-request figures (empty for one request).

    Parameters
    ----------
    run : dict[str, Any]
        A ``run.json`` (its ``sequential`` records, ``simulations.runner``).

    Returns
    -------
    list[dict[str, Any]]
        Per request: ``request``, ``client``, :data:`SEQUENTIAL_METRICS` and
        ``utility_ratio`` = model_utility / the step oracle's.
    """
    out = []
    for rec in run.get("sequential") or []:
        row: dict[str, Any] = {"request": rec["request"], "client": rec["client"]}
        for key, side, name in SEQUENTIAL_METRICS:
            row[key] = (rec.get(side) or {}).get(name)
        row["utility_ratio"] = _ratio(row["model_utility"], row["oracle_model_utility"])
        out.append(row)
    return out


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95 % Student-t interval (None for n < 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    from scipy import stats

    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {
        "mean": mean,
        "ci95": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n),
        "n": n,
    }


def _carried(cell: dict[str, Any]) -> dict[str, Any]:
    """Return a published cell's metrics, the keys older reports lack set empty."""
    empty = {k: None for k, _, _ in METRICS}
    empty.update(sequential=[], oracle_stopped=False, curve=[], oracle_curve_level=None)
    vals = {**empty, **cell, "carried": True}
    for k in ("scenario", "seed", "method"):
        vals.pop(k)
    return vals


def aggregate(
    suite: Suite, out: Path, carried: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """``results.json``: per-cell metrics and per (scenario, method) mean ± CI.

    Parameters
    ----------
    suite : Suite
        The suite (or a selection of it).
    out : Path
        Bench directory; its finished cells are measured afresh.
    carried : Sequence[dict[str, Any]]
        Per-cell entries of an earlier ``results.json`` (its ``cells``). A cell
        that ``out`` lacks is taken from them, marked ``carried``; a cell that
        ``out`` holds always replaces its carried entry.
    """
    earlier = {(c["scenario"], c["seed"], c["method"]): c for c in carried}
    per_cell, agg = [], {}
    for sc in suite.scenarios:
        agg[sc.name] = {}
        for m in filter(sc.runs, suite.methods):
            rows = []
            for seed in suite.seeds:
                path = out / sc.name / f"seed-{seed}" / m.label
                key = (sc.name, seed, m.label)
                if _done(path):
                    vals = {**cell_metrics(path), "carried": False}
                elif key in earlier:
                    vals = _carried(earlier[key])
                else:
                    continue
                rows.append(vals)
                per_cell.append(
                    {"scenario": sc.name, "seed": seed, "method": m.label, **vals}
                )
            entry = {k: mean_ci([r[k] for r in rows]) for k, _, _ in METRICS}
            entry["seeds"] = len(rows)
            if any(r["sequential"] for r in rows):
                entry["sequential"] = aggregate_requests(
                    [r["sequential"] for r in rows]
                )
            entry["oracle_stopped"] = any(r["oracle_stopped"] for r in rows)
            agg[sc.name][m.label] = entry
    return {
        "suite": suite.name,
        "description": suite.description,
        "purpose": suite.purpose,
        "seeds": list(suite.seeds),
        "scenarios": {
            s.name: {"departs": s.departs, **s.config} for s in suite.scenarios
        },
        "methods": {
            m.label: {"name": m.name, "options": m.options} for m in suite.methods
        },
        "aggregate": agg,
        "cells": per_cell,
    }


def aggregate_requests(cells_: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean ± CI over seeds of each request's figures (request j of every cell).

    Parameters
    ----------
    cells_ : Sequence[list[dict[str, Any]]]
        Per seed, :func:`sequential_metrics` of its cell.

    Returns
    -------
    list[dict[str, Any]]
        Per request index j (1-based, as long as the shortest cell): ``request``
        and :func:`mean_ci` of every per-request figure.
    """
    keys = [k for k, _, _ in SEQUENTIAL_METRICS] + ["utility_ratio"]
    length = min((len(c) for c in cells_ if c), default=0)
    return [
        {
            "request": j + 1,
            **{k: mean_ci([c[j][k] for c in cells_ if c]) for k in keys},
        }
        for j in range(length)
    ]


def _fmt(entry: dict[str, Any], digits: int) -> str:
    if entry["mean"] is None:
        return "–"
    if entry["ci95"] is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def render_markdown(results: dict[str, Any], plots: dict[str, list[str]]) -> str:
    """Render the report: a table per scenario (mean ± 95 % CI), the plots."""
    lines = [
        f"# Bench `{results['suite']}`",
        "",
        results["description"],
        "",
        f"Purpose: {results['purpose']}. Seeds: {results['seeds']} (a seed sets the "
        "data, the LoRA init, the data order and which clients depart). Values: "
        "mean ± half-width of the 95 % Student-t interval over seeds. Oracle-stopped "
        "rows are upper bounds that read the retrain oracle; their cost includes it.",
        "",
        "Regenerate: `fed-unlearn bench " + results["suite"] + " --out DIR --publish`.",
    ]
    cells_ = results.get("cells", [])
    carried = [c for c in cells_ if c.get("carried")]
    if carried:
        shas = sorted({str(c.get("git_sha") or "not recorded")[:12] for c in carried})
        lines += [
            "",
            f"Cells: {len(cells_) - len(carried)} measured in this bench, "
            f"{len(carried)} carried over from the earlier publication "
            f"(commits: {', '.join(shas)}).",
        ]
    for sc, rows in results["aggregate"].items():
        conf = results["scenarios"][sc]
        lines += ["", f"## {sc}", "", "`" + json.dumps(conf, sort_keys=True) + "`", ""]
        shown = [
            (k, h, d)
            for k, h, d in METRICS
            if k not in OPTIONAL_METRICS
            or any(e.get(k, {}).get("mean") is not None for e in rows.values())
        ]
        lines.append("| method | seeds | " + " | ".join(h for _, h, _ in shown) + " |")
        lines.append("|---|---:|" + "---:|" * len(shown))
        unrun = [label for label, e in rows.items() if not e["seeds"]]
        rows = {label: e for label, e in rows.items() if e["seeds"]}
        for label, e in rows.items():
            name = label + (
                " — oracle-stopped (upper bound)" if e["oracle_stopped"] else ""
            )
            cells_ = " | ".join(_fmt(e[k], d) for k, _, d in shown)
            lines.append(f"| {name} | {e['seeds']} | {cells_} |")
        if unrun:
            lines += ["", "No finished cell yet: " + ", ".join(unrun) + "."]
        lines += _sequential_md(rows)
        for png in plots.get(sc, []):
            lines += ["", f"![{png}]({png})"]
    return "\n".join(lines) + "\n"


def _sequential_md(rows: dict[str, Any]) -> list[str]:
    """Per-request tables (utility, forget prob) of a sequential scenario."""
    seq = {label: e["sequential"] for label, e in rows.items() if e.get("sequential")}
    if not seq:
        return []
    n = max(len(v) for v in seq.values())
    head = "| method | " + " | ".join(f"request {j}" for j in range(1, n + 1)) + " |"
    rule = "|---|" + "---:|" * n
    out: list[str] = []
    for title, key, oracle in (
        (
            "model_utility after each request (oracle = retrain without every "
            "client departed so far)",
            "model_utility",
            "oracle_model_utility",
        ),
        (
            "forget_Q_A_Prob of each request's own forget set",
            "request_forget_Q_A_Prob",
            "oracle_request_forget_Q_A_Prob",
        ),
        (
            "forget_Q_A_Prob of all clients forgotten so far",
            "forget_Q_A_Prob",
            "oracle_forget_Q_A_Prob",
        ),
    ):
        out += ["", f"Sequential requests: {title}.", "", head, rule]
        for label, reqs in seq.items():
            out.append(
                f"| {label} | " + " | ".join(_fmt(r[key], 3) for r in reqs) + " |"
            )
        first = next(iter(seq.values()))
        out.append(
            "| retrain oracle (per step) | "
            + " | ".join(_fmt(r[oracle], 3) for r in first)
            + " |"
        )
    return out


def _plots(results: dict[str, Any], out: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made: dict[str, list[str]] = {}
    for sc, rows in results["aggregate"].items():
        labels = [label for label, e in rows.items() if e["seeds"]]
        if not labels:
            continue
        # horizontal bars: the method labels stay readable however many rows
        fig, axes = plt.subplots(
            1, 3, figsize=(13, 1.2 + 0.32 * len(labels)), sharey=True
        )
        for ax, (key, head) in zip(
            axes,
            (
                ("gap_closed", "gap closed"),
                ("utility_ratio", "model_utility × retrain"),
                ("forget_quality", "forget_quality"),
            ),
            strict=True,
        ):
            means = [rows[m][key]["mean"] or 0.0 for m in labels]
            errs = [rows[m][key]["ci95"] or 0.0 for m in labels]
            ax.barh(range(len(labels)), means, xerr=errs, capsize=3, color="#4c72b0")
            ax.set_yticks(range(len(labels)), labels)
            ax.invert_yaxis()
            ax.set_title(head)
            if key != "forget_quality":
                ax.axvline(1.0, color="k", lw=0.8, ls="--")
        fig.tight_layout()
        bars = f"{sc}_bars.png"
        fig.savefig(out / bars, dpi=110)
        plt.close(fig)
        # forgetting curves: mean over seeds with the seed spread, oracle level
        fig, ax = plt.subplots(figsize=(6.5, 4))
        oracle = []
        for i, label in enumerate(labels):
            curves = [
                c["curve"]
                for c in results["cells"]
                if c["scenario"] == sc and c["method"] == label and c["curve"]
            ]
            oracle += [
                c["oracle_curve_level"]
                for c in results["cells"]
                if c["scenario"] == sc
                and c["method"] == label
                and c["oracle_curve_level"] is not None
            ]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            ys = np.array([[y for _, y in c[:length]] for c in curves])
            xs = [x for x, _ in curves[0][:length]]
            color = f"C{i % 10}"
            ax.plot(xs, ys.mean(0), color=color, label=label, marker="o", ms=3)
            if len(curves) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        if oracle:
            ax.axhline(
                float(np.mean(oracle)), color="k", ls="--", lw=1, label="retrain oracle"
            )
        ax.set_xlabel("unlearning round")
        ax.set_ylabel("forget_Q_A_Prob (curve subset)")
        ax.set_title(f"{sc}: forgetting curve (mean, band = seed range)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        curve = f"{sc}_curve.png"
        fig.savefig(out / curve, dpi=110)
        plt.close(fig)
        made[sc] = [bars, curve]
        seq = {m: e["sequential"] for m, e in rows.items() if e.get("sequential")}
        if seq:
            made[sc].append(_plot_requests(sc, seq, out))
    return made


def _plot_requests(sc: str, seq: dict[str, list[dict[str, Any]]], out: Path) -> str:
    """Plot model_utility against requests (mean ± CI) with the per-step oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, reqs) in enumerate(seq.items()):
        xs = [r["request"] for r in reqs]
        ys = [r["model_utility"]["mean"] for r in reqs]
        err = [r["model_utility"]["ci95"] or 0.0 for r in reqs]
        if any(y is None for y in ys):
            continue
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            color=f"C{i % 10}",
            marker="o",
            ms=3,
            capsize=3,
            label=label,
        )
    first = next(iter(seq.values()))
    ys = [r["oracle_model_utility"]["mean"] for r in first]
    if all(y is not None for y in ys):
        ax.plot(
            [r["request"] for r in first],
            ys,
            color="k",
            ls="--",
            lw=1,
            label="sequential retrain oracle",
        )
    ax.set_xlabel("forget requests served")
    ax.set_ylabel("model_utility")
    ax.set_title(f"{sc}: utility against requests (mean ± 95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{sc}_requests.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_results(suite: Suite, results: dict[str, Any], out: Path) -> None:
    """Write ``results.json``, ``report.md`` and the plots into ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = _plots(results, out)
    (out / "report.md").write_text(render_markdown(results, plots))


def publish(suite: Suite, out: Path, dest: Path = DOCS_RESULTS) -> Path:
    """Write the whole suite's report, plots and results into ``dest/<suite>/``.

    ``suite`` is the whole suite, not a ``--methods``/``--seeds`` selection:
    every cell finished in ``out`` is measured afresh, and every other cell is
    carried over from the report already published there (its ``results.json``),
    so a bench of a few cells updates those rows without dropping the rest. The
    report says how many cells were carried. Re-run every cell of a method whose
    code or defaults changed: a carried cell is what that method did then.
    """
    target = dest / suite.name
    published = target / "results.json"
    carried: list[dict[str, Any]] = []
    if published.is_file():
        try:
            carried = json.loads(published.read_text()).get("cells", [])
        except json.JSONDecodeError as exc:
            msg = f"{published}: not JSON ({exc}); nothing published"
            raise SuiteError(msg) from None
    results = aggregate(suite, out, carried)
    target.mkdir(parents=True, exist_ok=True)
    write_results(suite, results, target)
    return target
