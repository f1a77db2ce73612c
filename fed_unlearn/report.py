"""Human-readable report (Markdown, HTML, PNG figures) of finished run directories.

:func:`write_report` reads one or more run directories written by
``fed-unlearn run`` / ``fed-unlearn unlearn`` (same FL configuration, e.g. one
run per unlearning method) and writes into ``out_dir``::

    report.md                    config header, results table, sample generations
    report.html                  the same, self-contained (inline CSS, <img> tags)
    forgetting_curve.png         forget_Q_A_Prob per unlearning round
    utility_vs_forgetting.png    model_utility against forget_Q_A_Prob
    relearning_attack.png        the relearning audit's curves (runs that ran it)
    attribution_histograms.png   MLP-neuron attribution, before and after
                                 (runs with eval-attribution)

A run directory holds ``run.json`` and, once evaluated,
``evals/{original,unlearned,retrain}/TOFU_SUMMARY.json`` and ``TOFU_EVAL.json``.
Metric values are taken from ``TOFU_SUMMARY.json`` when present, else from
``run.json["summary"]``. Missing values print as "–".
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fed_unlearn.config import METHOD_OPTION_PREFIX  # noqa: E402
from fed_unlearn.metrics.relearn import relearn_gap  # noqa: E402

__all__ = ["write_report"]

#: Printed for a missing / non-finite value.
MISSING = "–"

#: Reference models, shown in the first block of the table.
REFERENCE_MODELS = ("original", "retrain")

#: Config keys that may differ between runs of one report.
_IGNORED_CONFIG_KEYS = frozenset(
    {"method", "depart", "out-dir", "departed-online", "eval-gradnorm"}
)
_IGNORED_CONFIG_PREFIXES = ("eval-", "method-", "x-")

#: Metric columns: (key, header).
_METRIC_COLUMNS = (
    ("forget_quality", "forget_quality ↑"),
    ("model_utility", "model_utility ↑"),
    ("forget_Q_A_Prob", "forget_Q_A_Prob ≈"),
    ("forget_Q_A_ROUGE", "forget_Q_A_ROUGE ≈"),
    ("privleak", "privleak ≈0"),
)
_OTHER_COLUMNS = ("T2F ↓", "time / retrain ↓", "bytes / retrain ↓", "relearn gap ≈0")
_HEADERS = ("method", *(h for _, h in _METRIC_COLUMNS), *_OTHER_COLUMNS)

_TABLE_NOTE = (
    "↑ higher is better; ↓ lower is better; ≈ closer to the retrain oracle is "
    "better; privleak ≈0: closer to 0 is better. forget_quality is the KS-test "
    "p-value against the retrain model (absent for the retrain model itself). "
    "T2F: first unlearning round whose per-round forget_Q_A_Prob stays close to "
    "the oracle's. time / bytes: unlearning wall time / communicated bytes divided "
    "by those of retraining from scratch; the wall times leave out the per-round "
    "curve evaluation of the simulation (when both runs timed it), which a "
    "deployment does not run. relearn gap (runs with eval-relearn-steps): after "
    "the relearning attack, the unlearned model's forget_Q_A_Prob on the held-out "
    "probes minus the attacked oracle's, over the original-oracle gap before the "
    "attack (0: no more comes back than the oracle learns; 1: the whole gap)."
)

#: The relearning audit's scenarios (:mod:`fed_unlearn.metrics.relearn`):
#: (``run.json`` key, name, x axis of its curves, x-axis label).
_RELEARN_SCENARIOS = (
    ("relearn_benign", "benign", "round", "FL rounds of the remaining clients"),
    ("relearn", "adversarial", "step", "attack steps on part of the forget set"),
)
_RELEARN_HEADERS = (
    "method",
    "scenario",
    "budget",
    "recovery ratio ↓",
    "oracle's (floor)",
    "relearn gap ≈0",
)
_RELEARN_NOTE = (
    "The relearning audit (fed-unlearn audit relearn, or eval-relearn-steps / "
    "eval-relearn-benign-rounds). benign: the remaining clients go on with "
    "more FL rounds, forget_Q_A_Prob on the forget set; adversarial: a "
    "rejoining client fine-tunes on some of each forgotten person's items, "
    "forget_Q_A_Prob on the others. recovery ratio: (after - before) / "
    "(original before - before) of the model's score, the share of what "
    "unlearning removed that comes back (0: none, 1: all; – when nothing was "
    "removed). The retrain oracle's ratio under the same attack is the floor "
    "(genuine learning); a robust method is close to it."
)

_NUM_SAMPLES = 3
#: Method colours (no green / grey: those mark the retrain and original models).
_PALETTE = ("C0", "C1", "C3", "C4", "C5", "C6", "C8", "C9")
_FORGETTING_PNG = "forgetting_curve.png"
_UTILITY_PNG = "utility_vs_forgetting.png"
_RELEARN_PNG = "relearning_attack.png"
_ATTRIBUTION_PNG = "attribution_histograms.png"
#: Columns of the attribution table.
_ATTRIBUTION_HEADERS = (
    "model",
    "turned negative ↓",
    "negative neurons",
    "positive mass",
    "negative mass",
    "negative share",
)
_ATTRIBUTION_NOTE = (
    "MLP neurons' mean gradient x activation attribution to the forget answers "
    "(eval-attribution). turned negative: neurons >= 0 in the original model "
    "and below -τ after (τ = eval-attribution-tau x the original's mean "
    "|attribution|); masses: sums of the positive and negative parts. A method "
    "that hides the answers instead of erasing them grows negative neurons "
    "(Ssiuu's spurious unlearning neurons)."
)
_REQUESTS_PNG = "utility_vs_requests.png"


@dataclass
class _Run:
    """One loaded run directory."""

    path: Path
    run: dict[str, Any]
    label: str = ""
    #: model name -> metric -> value (merged TOFU_SUMMARY.json / run.json summary).
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: model name -> split -> generation records (from TOFU_EVAL.json).
    generations: dict[str, dict[str, list[dict[str, Any]]]] = field(
        default_factory=dict
    )

    @property
    def method(self) -> str:
        """Unlearning method of the run."""
        method = self.run.get("method") or self.config.get("method")
        return str(method) if method else self.path.name

    @property
    def config(self) -> dict[str, Any]:
        """Flat run configuration (``run.json["config"]``)."""
        cfg = self.run.get("config")
        return cfg if isinstance(cfg, dict) else {}


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def _load_run(path: Path) -> _Run:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run directory does not exist")
    run_json = path / "run.json"
    if not run_json.is_file():
        raise FileNotFoundError(
            f"{run_json}: not found ({path} is not a run directory)"
        )
    run = _read_json(run_json)
    if not isinstance(run, dict):
        raise ValueError(f"{run_json}: expected a JSON object")
    out = _Run(path=path, run=run)
    summary = run.get("summary") or {}
    for name in ("original", "unlearned", "retrain"):
        values = dict(summary.get(name) or {})
        summ_path = path / "evals" / name / "TOFU_SUMMARY.json"
        if summ_path.is_file():
            summ = _read_json(summ_path)
            if isinstance(summ, dict):
                values.update({k: v for k, v in summ.items() if v is not None})
        if values:
            out.values[name] = values
        eval_path = path / "evals" / name / "TOFU_EVAL.json"
        if eval_path.is_file():
            gens = _read_json(eval_path)
            gens = gens.get("generations") if isinstance(gens, dict) else None
            if isinstance(gens, dict):
                out.generations[name] = gens
    return out


def _comparable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    # a key a run does not record (written before the key existed) had its default
    out = {k: v for k, v in _config_defaults().items() if k not in cfg}
    out.update(cfg)
    return {
        k: v
        for k, v in out.items()
        if k not in _IGNORED_CONFIG_KEYS and not k.startswith(_IGNORED_CONFIG_PREFIXES)
    }


def _config_defaults() -> dict[str, Any]:
    """Flat defaults of the keys that do not depend on the preset."""
    from fed_unlearn.config import PRESET_DEFAULTS, RunConfig

    flat = RunConfig().to_flat()
    preset_keys = {k.replace("_", "-") for k in PRESET_DEFAULTS["tiny"]}
    return {k: v for k, v in flat.items() if k not in preset_keys | {"preset"}}


def _check_same_fl_config(runs: Sequence[_Run]) -> None:
    """Raise ``ValueError`` naming the differing keys when FL configs differ."""
    first = runs[0]
    ref = _comparable_config(first.config)
    for other in runs[1:]:
        cfg = _comparable_config(other.config)
        diff = sorted(k for k in ref.keys() | cfg.keys() if ref.get(k) != cfg.get(k))
        if diff:
            details = "; ".join(
                f"{k!r}: {ref.get(k)!r} in {first.path} vs {cfg.get(k)!r} in "
                f"{other.path}"
                for k in diff
            )
            raise ValueError(
                "run directories have different FL configs (differing key"
                f"{'s' if len(diff) > 1 else ''} {', '.join(diff)}): {details}"
            )


def _method_options(r: _Run) -> dict[str, str]:
    """Return the run's ``--opt`` method options (config ``method-<option>``)."""
    return {
        k.removeprefix(METHOD_OPTION_PREFIX): str(v)
        for k, v in r.config.items()
        if k.startswith(METHOD_OPTION_PREFIX)
    }


def _assign_labels(runs: Sequence[_Run]) -> None:
    """Label runs by method (and inner loss).

    Runs of one method are told apart by the method options that differ between
    them, or by directory name when their options are the same.
    """

    def base(r: _Run) -> str:
        inner = (r.run.get("unlearn_info") or {}).get("inner_loss")
        return f"{r.method}/{inner}" if inner else r.method

    names = [base(r) for r in runs]
    for name in set(names):
        group = [r for r, n in zip(runs, names, strict=True) if n == name]
        if len(group) == 1:
            group[0].label = name
            continue
        opts = [_method_options(r) for r in group]
        keys = sorted({k for o in opts for k in o})
        differ = [k for k in keys if len({o.get(k) for o in opts}) > 1]
        for r, o in zip(group, opts, strict=True):
            parts = [f"{k}={o[k]}" for k in differ if k in o]
            if not differ:
                r.label = f"{name} ({r.path.name})"
            else:
                r.label = f"{name} ({', '.join(parts) or 'defaults'})"
    for r in runs:
        if r.run.get("oracle_stopped"):
            r.label = f"{r.label} — oracle-stopped (upper bound)"
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):
        if labels.count(r.label) > 1:
            r.label = f"{r.label} #{i + 1}"


# --------------------------------------------------------------------------
# values and formatting
# --------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """``x`` as a finite float, else ``None``."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: Any, digits: int = 4) -> str:
    """Format with ``digits`` significant digits, :data:`MISSING` when absent."""
    v = _num(x)
    return MISSING if v is None else f"{v:.{digits}g}"


def _fmt_int(x: Any) -> str:
    v = _num(x)
    return MISSING if v is None else str(int(v))


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(num: Any, den: Any) -> float | None:
    n, d = _num(num), _num(den)
    if n is None or d is None or d <= 0:
        return None
    return n / d


def _reference_values(runs: Sequence[_Run], name: str) -> dict[str, Any]:
    """Values of reference model ``name`` from the first run that has them."""
    for r in runs:
        if r.values.get(name):
            return r.values[name]
    return {}


def _table_rows(runs: Sequence[_Run]) -> tuple[list[list[str]], list[list[str]]]:
    """Format the results table as (reference rows, run rows)."""
    ref_rows = []
    for name in REFERENCE_MODELS:
        vals = _reference_values(runs, name)
        rel = "1" if name == "retrain" else MISSING
        ref_rows.append(
            [
                name,
                *(_fmt(vals.get(k)) for k, _ in _METRIC_COLUMNS),
                MISSING,
                rel,
                rel,
                _fmt(_reference_relearn_gap(runs, name), 3),
            ]
        )
    run_rows = []
    for r in runs:
        vals = r.values.get("unlearned", {})
        wt, by = r.run.get("wall_time_s") or {}, r.run.get("bytes") or {}
        t_rel = _ratio(*_method_walls(wt))
        b_rel = _ratio(_dig(by, "unlearn", "total"), _dig(by, "retrain", "total"))
        run_rows.append(
            [
                r.label,
                *(_fmt(vals.get(k)) for k, _ in _METRIC_COLUMNS),
                _fmt_int(r.run.get("T2F")),
                _fmt(t_rel, 3),
                _fmt(b_rel, 3),
                _fmt(_dig(r.run, "relearn", "relearn_gap"), 3),
            ]
        )
    return ref_rows, run_rows


def _relearn_curves(
    runs: Sequence[_Run], key: str = "relearn"
) -> dict[str, Any] | None:
    """Curves of scenario ``key`` of the first run that ran it."""
    for r in runs:
        curves = _dig(r.run, key, "curves")
        if isinstance(curves, dict) and "original" in curves and "retrain" in curves:
            return curves
    return None


def _reference_relearn_gap(runs: Sequence[_Run], name: str) -> float | None:
    """Return a reference model's relearn gap (0 for the oracle by definition)."""
    curves = _relearn_curves(runs)
    if curves is None:
        return None
    return relearn_gap({**curves, "unlearned": curves[name]})


def _method_walls(wt: dict[str, Any]) -> tuple[Any, Any]:
    """Return the (unlearning, retrain) wall times to compare.

    Without the per-round curve evaluation when both phases timed it, else the
    totals.
    """
    excl = wt.get("excl_curve_eval") or {}
    if excl.get("unlearn") is not None and excl.get("retrain") is not None:
        return excl["unlearn"], excl["retrain"]
    return wt.get("unlearn"), wt.get("retrain")


def _header_items(runs: Sequence[_Run]) -> list[tuple[str, str]]:
    """(name, value) pairs describing the shared configuration."""
    first = runs[0]
    cfg, run = first.config, first.run
    model = str(cfg.get("preset", MISSING))
    if cfg.get("model-path"):
        model += f" ({cfg['model-path']})"
    rounds = run.get("rounds") or {}
    rounds_txt = ", ".join(
        f"{k} {rounds[k]}" for k in ("train", "retrain") if rounds.get(k) is not None
    )
    if not rounds_txt:
        rounds_txt = str(cfg.get("num-server-rounds", MISSING))
    departed = [sorted(r.run.get("departed") or []) for r in runs]
    departed_txt = str(departed[0]) if departed else MISSING
    if any(d != departed[0] for d in departed):
        departed_txt += " (differs between runs: reference rows are from the first)"
    shas = {str(r.run.get("git_sha")) for r in runs if r.run.get("git_sha")}
    sha = str(run.get("git_sha") or MISSING)
    if len(shas) > 1:
        sha += f" (runs use {len(shas)} different commits)"
    return [
        ("runs", ", ".join(str(r.path) for r in runs)),
        ("model", model),
        ("clients", str(cfg.get("num-clients", MISSING))),
        ("departed", departed_txt),
        ("rounds", rounds_txt),
        ("seed", str(cfg.get("seed", MISSING))),
        ("git sha", sha),
    ]


def _samples(r: _Run) -> list[dict[str, str]]:
    """Up to :data:`_NUM_SAMPLES` forget-set generations of the unlearned model."""
    items = (r.generations.get("unlearned") or {}).get("forget") or []
    retrain = (r.generations.get("retrain") or {}).get("forget") or []
    retrain_by_q = {
        str(it.get("question")): it.get("generation")
        for it in retrain
        if isinstance(it, dict)
    }
    out = []
    for it in items[:_NUM_SAMPLES]:
        if not isinstance(it, dict):
            continue
        q = str(it.get("question", MISSING))
        sample = {
            "question": q,
            "ground_truth": str(it.get("ground_truth", MISSING)),
            "generation": str(it.get("generation", MISSING)),
        }
        if retrain_by_q.get(q) is not None:
            sample["retrain generation"] = str(retrain_by_q[q])
        out.append(sample)
    return out


# --------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------


def _curve_points(r: _Run, phase: str) -> list[tuple[float, float]]:
    curve = _dig(r.run, "curves", phase)
    pts = []
    for p in curve if isinstance(curve, list) else []:
        x = _num(p.get("round")) if isinstance(p, dict) else None
        y = _num(p.get("forget_Q_A_Prob")) if isinstance(p, dict) else None
        if x is not None and y is not None:
            pts.append((x, y))
    return sorted(pts)


def _color(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _first(values: Sequence[float | None]) -> float | None:
    return next((v for v in values if v is not None), None)


def _plot_forgetting(runs: Sequence[_Run], path: Path) -> str:
    """Write the forgetting-curve figure; return its caption."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    with_curve = [r for r in runs if _curve_points(r, "unlearn")]
    all_x: list[float] = [0.0]
    if with_curve:
        # Curves are measured on the per-round item subset: take the reference
        # levels on that same subset (as T2F does), else the full evaluation.
        def last(r: _Run, phase: str) -> float | None:
            pts = _curve_points(r, phase)
            return pts[-1][1] if pts else None

        oracle = _first([last(r, "retrain") for r in runs])
        original = _first([last(r, "train") for r in runs])
        subset = oracle is not None
        if oracle is None:
            oracle = _num(_reference_values(runs, "retrain").get("forget_Q_A_Prob"))
        if original is None:
            original = _num(_reference_values(runs, "original").get("forget_Q_A_Prob"))
        for i, r in enumerate(runs):
            if r not in with_curve:
                continue
            xs, ys = zip(*_curve_points(r, "unlearn"), strict=True)
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=4,
                linewidth=1.6,
                label=r.label,
                color=_color(i),
            )
            all_x += xs
        ax.set_title("Forgetting curve (per-round forget_Q_A_Prob)")
        caption = (
            "forget_Q_A_Prob of the global model after each unlearning round "
            "(per-round evaluation subset; round 0 = the trained model)."
        )
        caption += (
            " Reference lines: last per-round value of retraining (oracle) and of "
            "training (before unlearning), on the same subset."
            if subset
            else " Reference lines are from the full evaluation."
        )
        missing = [r.label for r in runs if r not in with_curve]
        if missing:
            caption += f" No curve recorded for: {', '.join(missing)}."
    else:
        oracle = _num(_reference_values(runs, "retrain").get("forget_Q_A_Prob"))
        original = _num(_reference_values(runs, "original").get("forget_Q_A_Prob"))
        for i, r in enumerate(runs):
            x = _num(_dig(r.run, "rounds", "unlearn"))
            y = _num(r.values.get("unlearned", {}).get("forget_Q_A_Prob"))
            if x is not None and y is not None:
                ax.plot(
                    [x],
                    [y],
                    marker="o",
                    markersize=8,
                    linestyle="",
                    label=r.label,
                    color=_color(i),
                )
                all_x.append(x)
        ax.set_title("Final forget_Q_A_Prob per method (no per-round curves)")
        caption = (
            "No run recorded per-round curves: final forget_Q_A_Prob of each "
            "unlearned model, at its number of unlearning rounds."
        )
    if oracle is not None:
        ax.axhline(
            oracle,
            color="tab:green",
            linestyle="--",
            linewidth=1.8,
            label="retrain oracle",
        )
    if original is not None:
        ax.axhline(
            original,
            color="0.3",
            linestyle=":",
            linewidth=1.8,
            label="before unlearning",
        )
    ax.set_xlabel("unlearning round")
    ax.set_ylabel("forget_Q_A_Prob (lower = more forgotten)")
    ax.grid(alpha=0.3)
    ax.set_xlim(min(all_x) - 0.3, max(all_x) + 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return caption


def _plot_relearn(runs: Sequence[_Run], path: Path) -> str | None:
    """Write the relearning-audit figure, a panel per scenario (None: no audit)."""
    panels = [
        (key, name, x, label, refs)
        for key, name, x, label in _RELEARN_SCENARIOS
        if (refs := _relearn_curves(runs, key)) is not None
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.5 * len(panels), 4.5), dpi=120, squeeze=False
    )
    score = "forget_Q_A_Prob"
    skipped: set[str] = set()
    for ax, (key, name, x, label, refs) in zip(axes[0], panels, strict=True):
        for ref, style in (
            (
                "retrain",
                {"color": "tab:green", "linestyle": "--", "label": "retrain oracle"},
            ),
            (
                "original",
                {"color": "0.3", "linestyle": ":", "label": "before unlearning"},
            ),
        ):
            pts = refs[ref]
            ax.plot(
                [p[x] for p in pts], [p[score] for p in pts], linewidth=1.8, **style
            )
        for i, r in enumerate(runs):
            pts = _dig(r.run, key, "curves", "unlearned")
            if not pts:
                skipped.add(r.label)
                continue
            ax.plot(
                [p[x] for p in pts],
                [p[score] for p in pts],
                marker="o",
                markersize=4,
                linewidth=1.6,
                color=_color(i),
                label=r.label,
            )
        ax.set_xlabel(label)
        ax.set_ylabel(
            "forget_Q_A_Prob on held-out probes"
            if name == "adversarial"
            else "forget_Q_A_Prob on the forget set"
        )
        ax.set_title(f"Relearning: {name}")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    names = [p[1] for p in panels]
    caption = (
        "Each model under the relearning audit ("
        + " and ".join(names)
        + "): benign, the remaining clients' next FL rounds; adversarial, a "
        "fine-tune on some forget-set items (the attacker's), scored on the "
        "forget items it never saw. A curve that climbs above the oracle's means "
        "the knowledge was hidden, not removed."
    )
    if skipped:
        caption += f" No attack recorded for: {', '.join(sorted(skipped))}."
    return caption


def _relearn_rows(runs: Sequence[_Run]) -> list[list[str]]:
    """Rows of the relearning-audit table (empty when no run ran it)."""
    rows = []
    for r in runs:
        for key, name, x, _ in _RELEARN_SCENARIOS:
            sc = r.run.get(key)
            if not isinstance(sc, dict) or not sc.get("curves"):
                continue
            spec = sc.get("spec") or {}
            budget = spec.get("rounds" if x == "round" else "steps")
            unit = x if _num(budget) == 1 else f"{x}s"
            rows.append(
                [
                    r.label,
                    name,
                    f"{_fmt_int(budget)} {unit}",
                    _fmt(sc.get("recovery_ratio"), 3),
                    _fmt(sc.get("recovery_ratio_retrain"), 3),
                    _fmt(sc.get("relearn_gap"), 3),
                ]
            )
    return rows


def _attribution_rows(runs: Sequence[_Run]) -> list[list[str]]:
    """Rows of the attribution table (empty when no run measured it).

    The reference models (:data:`REFERENCE_MODELS`, from the first run that
    measured them) come first, then each run's unlearned model.
    """

    def row(label: str, m: dict[str, Any]) -> list[str]:
        return [
            label,
            _fmt_int(m.get("turned_negative")),
            _fmt_int(m.get("negative_neurons")),
            _fmt(m.get("positive_mass"), 3),
            _fmt(m.get("negative_mass"), 3),
            _fmt(m.get("negative_share"), 3),
        ]

    measured = [r for r in runs if _dig(r.run, "attribution", "models")]
    if not measured:
        return []
    refs = measured[0].run["attribution"]["models"]
    rows = [row(n, refs[n]) for n in REFERENCE_MODELS if n in refs]
    for r in measured:
        rows.append(row(r.label, r.run["attribution"]["models"]["unlearned"]))
    return rows


def _plot_attribution(runs: Sequence[_Run], path: Path) -> str | None:
    """Write the attribution-histogram figure (None when no run measured it)."""
    measured = [
        (i, r) for i, r in enumerate(runs) if _dig(r.run, "attribution", "models")
    ]
    if not measured:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)

    def stairs(att: dict[str, Any], name: str, **style: Any) -> None:
        unit = _num(_dig(att, "spec", "unit")) or 1.0
        edges = [e / unit for e in att["edges"]]
        ax.stairs(att["models"][name]["histogram"], edges, linewidth=1.6, **style)

    first = measured[0][1].run["attribution"]
    stairs(first, "original", color="0.3", linestyle=":", label="before unlearning")
    if "retrain" in first["models"]:
        stairs(
            first, "retrain", color="tab:green", linestyle="--", label="retrain oracle"
        )
    for i, r in measured:
        stairs(r.run["attribution"], "unlearned", color=_color(i), label=r.label)
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("neuron attribution to the forget answers / original mean |attr|")
    ax.set_ylabel("neurons")
    ax.set_title("MLP-neuron attribution, before and after unlearning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return (
        "Histogram of the MLP neurons' mean attribution to the forget answers, "
        "in units of the original model's mean |attribution|. Mass growing on "
        "the negative side means neurons that suppress the answer (hiding)."
    )


def _plot_utility(runs: Sequence[_Run], path: Path) -> str:
    """Write the utility-vs-forgetting scatter; return its caption."""
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    ref_style = {
        "original": {"marker": "s", "color": "0.25", "label": "original (before)"},
        "retrain": {"marker": "*", "color": "tab:green", "label": "retrain (oracle)"},
    }
    points: list[tuple[str, float, float]] = []
    for name in REFERENCE_MODELS:
        vals = _reference_values(runs, name)
        x, y = _num(vals.get("forget_Q_A_Prob")), _num(vals.get("model_utility"))
        if x is not None and y is not None:
            style = ref_style[name]
            size = 260 if style["marker"] == "*" else 110
            ax.scatter([x], [y], s=size, zorder=3, edgecolors="black", **style)
            points.append((name, x, y))
    skipped = []
    for i, r in enumerate(runs):
        vals = r.values.get("unlearned", {})
        x, y = _num(vals.get("forget_Q_A_Prob")), _num(vals.get("model_utility"))
        if x is None or y is None:
            skipped.append(r.label)
            continue
        ax.scatter(
            [x],
            [y],
            s=70,
            marker="o",
            color=_color(i),
            zorder=4,
            edgecolors="black",
            linewidths=0.5,
            label=r.label,
        )
        points.append((r.label, x, y))
    stacked: dict[tuple[float, float], int] = {}
    for label, x, y in points:
        # Stack the labels of (nearly) coincident points instead of overprinting.
        key = (round(x, 3), round(y, 3))
        stacked[key] = stacked.get(key, -1) + 1
        ax.annotate(
            label,
            (x, y),
            xytext=(6, 6 + 11 * stacked[key]),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xlabel("forget_Q_A_Prob (lower = more forgotten)")
    ax.set_ylabel("model_utility (higher = better)")
    ax.set_title("Utility vs. forgetting")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=9, loc="best")
        ax.margins(0.15)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    caption = (
        "Each unlearned model against the original and retrained models: the best "
        "methods sit close to the retrain oracle."
    )
    if skipped:
        caption += f" Not evaluated (no point): {', '.join(skipped)}."
    return caption


def _requests(r: _Run) -> list[dict[str, Any]]:
    """Return a sequential run's per-request records (``run.json["sequential"]``)."""
    reqs = r.run.get("sequential")
    return list(reqs) if isinstance(reqs, list) else []


def _plot_requests(runs: Sequence[_Run], path: Path) -> str | None:
    """Write model_utility against requests (sequential runs); return the caption."""
    seq = [(i, r) for i, r in enumerate(runs) if _requests(r)]
    if not seq:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    oracle_drawn = False
    for i, r in seq:
        reqs = _requests(r)
        xs = [q["request"] for q in reqs]
        ys = [_num((q.get("unlearned") or {}).get("model_utility")) for q in reqs]
        oracle = [_num((q.get("oracle") or {}).get("model_utility")) for q in reqs]
        if all(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", color=_color(i), label=r.label)
        if not oracle_drawn and all(y is not None for y in oracle):
            ax.plot(
                xs,
                oracle,
                ls="--",
                marker="*",
                color="tab:green",
                label="retrain oracle (without all departed so far)",
            )
            oracle_drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("forget requests served")
    ax.set_ylabel("model_utility (higher = better)")
    ax.set_title("Utility against sequential requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return (
        "Sequential departures: after each request, the unlearned model's "
        "model_utility against the retrain oracle of that step (FL without every "
        "client departed so far)."
    )


def _requests_md(runs: Sequence[_Run]) -> list[str]:
    """Return the per-request table of the sequential runs (empty: none)."""
    seq = [r for r in runs if _requests(r)]
    if not seq:
        return []
    lines = [
        "## Sequential requests",
        "",
        "| method | request | client | model_utility | oracle | request forget_"
        "Q_A_Prob | oracle | forget_Q_A_Prob (all so far) | oracle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in seq:
        for q in _requests(r):
            u, o = q.get("unlearned") or {}, q.get("oracle") or {}
            cells = [
                _fmt(u.get("model_utility")),
                _fmt(o.get("model_utility")),
                _fmt(u.get("request_forget_Q_A_Prob")),
                _fmt(o.get("request_forget_Q_A_Prob")),
                _fmt(u.get("forget_Q_A_Prob")),
                _fmt(o.get("forget_Q_A_Prob")),
            ]
            lines.append(
                f"| {_md_text(r.label)} | {q['request']} | {q['client']} | "
                + " | ".join(cells)
                + " |"
            )
    return [*lines, ""]


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------


def _md_text(s: str) -> str:
    """Single-line Markdown text with raw HTML neutralised."""
    s = " ".join(s.split())
    return html.escape(s, quote=False).replace("|", "\\|")


def _render_md(
    runs: Sequence[_Run],
    header: list[tuple[str, str]],
    rows: tuple[list[list[str]], list[list[str]]],
    captions: dict[str, str],
    attribution: Sequence[list[str]] = (),
) -> str:
    lines = ["# Federated unlearning report", ""]
    lines += [f"- **{k}**: {_md_text(v)}" for k, v in header]
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(_HEADERS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(_HEADERS) - 1)) + "|")
    ref_rows, run_rows = rows
    for row in ref_rows:
        lines.append("| " + " | ".join([f"*{row[0]}*", *row[1:]]) + " |")
    for row in run_rows:
        lines.append("| " + " | ".join([_md_text(row[0]), *row[1:]]) + " |")
    lines += ["", f"*Reference rows in italics.* {_TABLE_NOTE}", ""]
    relearn = _relearn_rows(runs)
    if relearn:
        lines += ["## Relearning audit", ""]
        lines.append("| " + " | ".join(_RELEARN_HEADERS) + " |")
        lines.append(
            "|"
            + "|".join(["---", "---", *["---:"] * (len(_RELEARN_HEADERS) - 2)])
            + "|"
        )
        for row in relearn:
            lines.append("| " + " | ".join([_md_text(row[0]), *row[1:]]) + " |")
        lines += ["", _RELEARN_NOTE, ""]
    if attribution:
        lines += ["## Neuron attribution", ""]
        lines.append("| " + " | ".join(_ATTRIBUTION_HEADERS) + " |")
        lines.append(
            "|" + "|".join(["---"] + ["---:"] * (len(_ATTRIBUTION_HEADERS) - 1)) + "|"
        )
        for row in attribution:
            name = f"*{row[0]}*" if row[0] in REFERENCE_MODELS else _md_text(row[0])
            lines.append("| " + " | ".join([name, *row[1:]]) + " |")
        lines += ["", _ATTRIBUTION_NOTE, ""]
    lines += ["## Figures", ""]
    for png, caption in captions.items():
        lines += [f"![{png}]({png})", "", caption, ""]
    lines += _requests_md(runs)
    lines += ["## Sample generations", "", "Forget-set questions, unlearned model.", ""]
    for r in runs:
        lines += [f"### {_md_text(r.label)}", ""]
        samples = _samples(r)
        if not samples:
            lines += ["No generations recorded.", ""]
            continue
        for i, s in enumerate(samples, 1):
            first, *rest = s.items()
            lines.append(f"{i}. **{first[0]}**: {_md_text(first[1])}")
            lines += [f"   - **{k}**: {_md_text(v)}" for k, v in rest]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
tbody.ref td { background: #f7f7f7; font-style: italic; }
tbody.ref tr:last-child td { border-bottom: 2px solid #888; }
dl.cfg dt { font-weight: bold; float: left; clear: left; width: 7em; }
dl.cfg dd { margin-left: 8em; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1.5em 0; }
.note { color: #555; font-size: 13px; }
ol.gen li { margin-bottom: 0.8em; }
ol.gen span.k { font-weight: bold; }
"""


def _render_html(
    runs: Sequence[_Run],
    header: list[tuple[str, str]],
    rows: tuple[list[list[str]], list[list[str]]],
    captions: dict[str, str],
    attribution: Sequence[list[str]] = (),
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Federated unlearning report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Federated unlearning report</h1>",
        '<dl class="cfg">',
    ]
    out += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in header]
    out += ["</dl>", "<h2>Results</h2>", "<table>", "<thead><tr>"]
    out += [f"<th>{e(h)}</th>" for h in _HEADERS]
    out.append("</tr></thead>")
    for cls, block in zip(("ref", "runs"), rows, strict=True):
        out.append(f'<tbody class="{cls}">')
        for row in block:
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody>")
    out += ["</table>", f'<p class="note">{e(_TABLE_NOTE)}</p>']
    relearn = _relearn_rows(runs)
    if relearn:
        out += ["<h2>Relearning audit</h2>", "<table>", "<thead><tr>"]
        out += [f"<th>{e(h)}</th>" for h in _RELEARN_HEADERS]
        out.append("</tr></thead><tbody>")
        for row in relearn:
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out += ["</tbody></table>", f'<p class="note">{e(_RELEARN_NOTE)}</p>']
    if attribution:
        out += ["<h2>Neuron attribution</h2>", "<table>", "<thead><tr>"]
        out += [f"<th>{e(h)}</th>" for h in _ATTRIBUTION_HEADERS]
        out.append("</tr></thead><tbody>")
        for row in attribution:
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out += ["</tbody></table>", f'<p class="note">{e(_ATTRIBUTION_NOTE)}</p>']
    out.append("<h2>Figures</h2>")
    for png, caption in captions.items():
        out += [
            "<figure>",
            f'<img src="{e(png)}" alt="{e(png)}">',
            f"<figcaption>{e(caption)}</figcaption>",
            "</figure>",
        ]
    out += [
        "<h2>Sample generations</h2>",
        "<p>Forget-set questions, unlearned model.</p>",
    ]
    for r in runs:
        out.append(f"<h3>{e(r.label)}</h3>")
        samples = _samples(r)
        if not samples:
            out.append("<p>No generations recorded.</p>")
            continue
        out.append('<ol class="gen">')
        for s in samples:
            parts = [f'<span class="k">{e(k)}:</span> {e(v)}' for k, v in s.items()]
            out.append("<li>" + "<br>".join(parts) + "</li>")
        out.append("</ol>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write a Markdown + HTML report with figures for finished run directories.

    Parameters
    ----------
    run_dirs : Sequence[str | Path]
        Run directories (each with a ``run.json``) sharing one FL configuration
        (they may differ in ``method``, ``depart``, ``out-dir`` and ``eval-*``);
        typically one per unlearning method. A single path is accepted as well.
    out_dir : str | Path
        Output directory (created if needed); receives ``report.md``,
        ``report.html``, ``forgetting_curve.png``,
        ``utility_vs_forgetting.png``; when a run ran the relearning audit
        (either scenario), ``relearning_attack.png`` and a "Relearning audit"
        table; when a run measured the neuron attribution
        (``eval-attribution``), a table and ``attribution_histograms.png``; for
        sequential runs ``utility_vs_requests.png`` with a per-request table.

    Returns
    -------
    Path
        Path of ``report.md``.

    Raises
    ------
    ValueError
        No run directories given, invalid JSON, or runs with different FL configs
        (the message names the differing keys).
    FileNotFoundError
        A run directory or its ``run.json`` does not exist.
    """
    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [_load_run(Path(p)) for p in run_dirs]
    _check_same_fl_config(runs)
    _assign_labels(runs)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = {
        _FORGETTING_PNG: _plot_forgetting(runs, out / _FORGETTING_PNG),
        _UTILITY_PNG: _plot_utility(runs, out / _UTILITY_PNG),
    }
    relearn = _plot_relearn(runs, out / _RELEARN_PNG)
    if relearn is not None:
        captions[_RELEARN_PNG] = relearn
    attribution = _plot_attribution(runs, out / _ATTRIBUTION_PNG)
    if attribution is not None:
        captions[_ATTRIBUTION_PNG] = attribution
    requests = _plot_requests(runs, out / _REQUESTS_PNG)
    if requests is not None:
        captions[_REQUESTS_PNG] = requests
    header = _header_items(runs)
    rows = _table_rows(runs)
    arows = _attribution_rows(runs)
    md_path = out / "report.md"
    md_path.write_text(
        _render_md(runs, header, rows, captions, arows) + "\n", encoding="utf-8"
    )
    (out / "report.html").write_text(
        _render_html(runs, header, rows, captions, arows), encoding="utf-8"
    )
    return md_path
