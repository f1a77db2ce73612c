"""``fed-unlearn audit relearn RUN_DIR``: the relearning audit of a finished run.

Both scenarios of :mod:`fed_unlearn.metrics.relearn` on the run's three
adapters (original, retrain oracle, unlearned), from its resolved config: the
synthetic data regenerates from the config's seed, user data is read from its
``data-dir``. (a) benign: more FL rounds of the remaining clients, in this
process (a measurement, see the metrics module); (b) adversarial: the
relearning attack. The run's own ``eval-relearn-steps`` /
``eval-relearn-benign-rounds`` call the same functions
(:func:`relearn_audit`) at the end of ``fed-unlearn run``.

Output (``relearn.json``)::

    {"adversarial": {"spec": ..., "curves": {name: [{"step", "forget_Q_A_Prob"}]},
                     "final": ..., "recovery_ratio": ..., "recovery_ratio_retrain": ...,
                     "relearn_gap": ...} | null,
     "benign": {"spec": ..., "curves": {name: [{"round", "forget_Q_A_Prob",
                "clients"}]}, ...same figures...} | null}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_unlearn import seeds
from fed_unlearn.config import ResolvedConfig
from fed_unlearn.types import AdapterState

#: ``fed-unlearn audit relearn`` without ``--steps`` on a run without
#: ``eval-relearn-steps``: attack steps (methods.md §4.12's middle budget).
DEFAULT_STEPS = 25
#: Likewise, benign FL rounds without ``--rounds`` / ``eval-relearn-benign-rounds``.
DEFAULT_ROUNDS = 3
#: The file the audit writes into the run directory.
RELEARN_JSON = "relearn.json"


class AuditError(ValueError):
    """A run directory the audit cannot read (the message names what is wrong)."""


def adversarial_scenario(
    cfg: ResolvedConfig,
    adapters: dict[str, AdapterState],
    model: Any,
    tok: Any,
    prompt_fn: Any,
    steps: int,
) -> dict[str, Any]:
    """Scenario (b): the relearning attack on each adapter.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (``eval-relearn-fraction`` and ``eval-relearn-lr``;
        the attack uses the run's batch size and length).
    adapters : dict[str, AdapterState]
        ``original``, ``retrain`` and ``unlearned``.
    model, tok, prompt_fn : Any
        The LoRA model, its tokenizer and prompt format.
    steps : int
        Attack steps (> 0).

    Returns
    -------
    dict[str, Any]
        ``spec`` (the attack's settings and item counts), ``curves`` (name ->
        probe ``forget_Q_A_Prob`` per attack step) and the figures of
        :func:`fed_unlearn.metrics.relearn.scenario_figures`.
    """
    from clients.task import dataset
    from fed_unlearn.metrics.relearn import (
        RelearnSpec,
        attack_each,
        relearn_curve,
        scenario_figures,
        split_attack,
    )
    from fed_unlearn.training import derive_seed

    attack, probes = split_attack(
        dataset(cfg).forget_items(cfg.departed()), cfg.eval_relearn_fraction
    )
    spec = RelearnSpec(
        steps=steps,
        fraction=cfg.eval_relearn_fraction,
        lr=cfg.relearn_lr(),
        batch_size=int(cfg.batch_size),
        max_length=int(cfg.max_length),
        seed=derive_seed(cfg.seed, seeds.RELEARN),
    )
    curves = attack_each(
        adapters,
        lambda state: relearn_curve(model, tok, prompt_fn, state, attack, probes, spec),
    )
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
        **scenario_figures(curves),
    }


def benign_scenario(
    cfg: ResolvedConfig,
    adapters: dict[str, AdapterState],
    model: Any,
    tok: Any,
    prompt_fn: Any,
    rounds: int,
    remaining: Sequence[int],
) -> dict[str, Any]:
    """Scenario (a): ``rounds`` more FL rounds of the remaining clients.

    Parameters
    ----------
    cfg : ResolvedConfig
        Run configuration (data, seed, ``fraction-train``, aggregation, the
        clients' recipe).
    adapters : dict[str, AdapterState]
        ``original``, ``retrain`` and ``unlearned``.
    model, tok, prompt_fn : Any
        The LoRA model, its tokenizer and prompt format.
    rounds : int
        FL rounds (>= 0).
    remaining : Sequence[int]
        The clients that train (``run.json["remaining"]``).

    Returns
    -------
    dict[str, Any]
        ``spec``, ``curves`` (name -> forget-set ``forget_Q_A_Prob`` per round)
        and the figures of :func:`fed_unlearn.metrics.relearn.scenario_figures`.

    Raises
    ------
    AuditError
        A dual-adapter run (its clients train with a regulariser that needs the
        server's prototype; the audit does not reproduce it).
    """
    from clients.task import dataset
    from fed_unlearn.metrics.relearn import (
        BenignSpec,
        attack_each,
        benign_curve,
        scenario_figures,
    )

    if cfg.dual_adapter:
        raise AuditError(
            "benign relearning: dual-adapter runs are not supported (their "
            "clients' K/V regulariser needs the server's prototype)"
        )
    from simulations.runner import eval_splits

    data = dataset(cfg)  # the items each client trains on in FL
    clients = {c: data.clients[c] for c in remaining}
    forget = eval_splits(cfg).forget  # the run's evaluated forget set
    spec = BenignSpec(
        rounds=rounds,
        start_round=int(cfg.num_server_rounds),
        seed=cfg.seed,
        num_clients=cfg.num_clients,
        fraction=cfg.fraction_train,
        train=cfg.train_spec(),
        aggregation=cfg.aggregation,
    )
    curves = attack_each(
        adapters,
        lambda state: benign_curve(
            model, tok, prompt_fn, state, clients, forget, spec, int(cfg.max_length)
        )[0],
    )
    return {
        "spec": {
            "rounds": rounds,
            "first_fl_round": spec.start_round + 1,
            "clients": list(clients),
            "fraction": spec.fraction,
            "aggregation": spec.aggregation,
            "forget_items": len(forget),
        },
        "curves": curves,
        **scenario_figures(curves),
    }


def relearn_audit(
    cfg: ResolvedConfig,
    adapters: dict[str, AdapterState],
    *,
    steps: int,
    rounds: int,
    remaining: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run both scenarios (a scenario at 0 steps / rounds is skipped: ``None``).

    Parameters
    ----------
    cfg : ResolvedConfig
        The run's configuration.
    adapters : dict[str, AdapterState]
        ``original``, ``retrain`` and ``unlearned``.
    steps : int
        Adversarial attack steps (0: skip scenario (b)).
    rounds : int
        Benign FL rounds (0: skip scenario (a)).
    remaining : Sequence[int], optional
        The clients of the benign rounds (default: ``cfg.remaining()``).

    Returns
    -------
    dict[str, Any]
        ``{"adversarial": ... | None, "benign": ... | None}``.
    """
    from fed_unlearn.metrics.relearn import MODELS
    from fed_unlearn.models import load_lora_model, prompt_formatter, resolve_model_dir

    missing = [m for m in MODELS if m not in adapters]
    if missing:
        raise AuditError(f"relearning audit: no {', '.join(missing)} adapter")
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    prompt_fn = prompt_formatter(tok)
    ordered = {m: adapters[m] for m in MODELS}
    return {
        "adversarial": (
            adversarial_scenario(cfg, ordered, model, tok, prompt_fn, steps)
            if steps
            else None
        ),
        "benign": (
            benign_scenario(
                cfg,
                ordered,
                model,
                tok,
                prompt_fn,
                rounds,
                cfg.remaining() if remaining is None else remaining,
            )
            if rounds
            else None
        ),
    }


def load_run(run_dir: Path) -> tuple[ResolvedConfig, dict[str, Any], dict[str, Any]]:
    """Read a run directory: its resolved config, ``run.json`` and adapters.

    Parameters
    ----------
    run_dir : Path
        A ``fed-unlearn run`` / ``unlearn`` / ``forget`` directory.

    Returns
    -------
    tuple[ResolvedConfig, dict[str, Any], dict[str, Any]]
        Config, run record, name -> adapter (``original``, ``unlearned``,
        ``retrain``).

    Raises
    ------
    AuditError
        No such directory, no readable ``run.json``, or a missing adapter.
    """
    import json

    from safetensors.torch import load_file

    from fed_unlearn.config import ConfigError, RunConfig

    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: no such run directory")
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise AuditError(f"{run_dir}: no run.json (not a fed-unlearn run directory)")
    try:
        run = json.loads(run_json.read_text())
        flat = dict(run["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{run_json}: unreadable ({exc})") from None
    try:
        cfg = RunConfig.from_flat(flat).resolved()
    except ConfigError as exc:
        raise AuditError(f"{run_json}: bad config ({exc})") from None
    adapters: dict[str, Any] = {}
    for name in ("original", "unlearned", "retrain"):  # the run's save order
        path = run_dir / "adapters" / name / "adapter_model.safetensors"
        if not path.is_file():
            raise AuditError(
                f"{path}: missing adapter (the audit needs a run that unlearned "
                f"and retrained: 'fed-unlearn run' or 'fed-unlearn unlearn')"
            )
        adapters[name] = load_file(str(path))
    return cfg, run, adapters


def audit_run_dir(
    run_dir: Path,
    steps: int | None = None,
    rounds: int | None = None,
    out: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``fed-unlearn audit relearn``: audit a run directory, write ``relearn.json``.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    steps : int, optional
        Attack steps (default: the run's ``eval-relearn-steps``, else
        :data:`DEFAULT_STEPS`; 0 skips scenario (b)).
    rounds : int, optional
        Benign rounds (default: the run's ``eval-relearn-benign-rounds``, else
        :data:`DEFAULT_ROUNDS`; 0 skips scenario (a)).
    out : Path, optional
        Where to write the JSON (default: ``RUN_DIR/relearn.json``, and then
        ``run.json``'s ``relearn`` / ``relearn_benign`` are updated too, so
        that ``fed-unlearn report`` and the bench read them).

    Returns
    -------
    tuple[dict[str, Any], Path]
        The audit and the path written.

    Raises
    ------
    AuditError
        A bad run directory, negative counts or both at 0, or data the audit
        cannot use (e.g. no forgotten person with two items to split).
    """
    from simulations.runner import write_json

    cfg, run, adapters = load_run(run_dir)
    steps = (cfg.eval_relearn_steps or DEFAULT_STEPS) if steps is None else steps
    rounds = (
        (cfg.eval_relearn_benign_rounds or DEFAULT_ROUNDS) if rounds is None else rounds
    )
    if steps < 0 or rounds < 0:
        raise AuditError(f"--steps and --rounds must be >= 0, got {steps}, {rounds}")
    if not steps and not rounds:
        raise AuditError("--steps 0 and --rounds 0: nothing to audit")
    remaining = run.get("remaining")
    try:
        audit = relearn_audit(
            cfg,
            adapters,
            steps=steps,
            rounds=rounds,
            remaining=None if remaining is None else [int(c) for c in remaining],
        )
    except AuditError:
        raise
    except ValueError as exc:  # e.g. no forgotten person with two items to split
        raise AuditError(f"relearning audit of {run_dir}: {exc}") from exc
    path = out if out is not None else run_dir / RELEARN_JSON
    write_json(path, audit)
    if out is None:
        put_in_run(run, audit)
        write_json(run_dir / "run.json", run)
    return audit, path


def put_in_run(run: dict[str, Any], audit: dict[str, Any]) -> None:
    """Put an audit's scenarios into ``run.json``'s record (in place).

    ``run["relearn"]`` is scenario (b) (the key the adversarial attack always
    had), ``run["relearn_benign"]`` scenario (a); a skipped scenario leaves
    the key as it was.
    """
    if audit.get("adversarial") is not None:
        run["relearn"] = audit["adversarial"]
    if audit.get("benign") is not None:
        run["relearn_benign"] = audit["benign"]
