"""``fed-unlearn`` command line.

Subcommands: ``run`` (FL -> departure -> unlearning -> retrain oracle -> evaluation),
``train``, ``unlearn DIR``, ``evaluate DIR``, ``audit relearn DIR`` (the
relearning audit, :mod:`simulations.audit`), ``methods``, ``deploy demo`` (the
secure cross-silo federation on loopback: TLS, authenticated SuperNodes). Bad input
exits with status 2 and one readable line, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fed_unlearn.config import ConfigError, ResolvedConfig, RunConfig, parse_value

log = logging.getLogger("fed_unlearn")


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name in (
        "preset",
        "clients",
        "depart",
        "method",
        "rounds",
        "seed",
        "model",
        "data_dir",
        "aggregation",
        "local_epochs",
        "lr",
        "lora_r",
        "sequential",
    ):
        value = getattr(args, name, None)
        if value is None:
            continue
        key = {
            "clients": "num-clients",
            "rounds": "num-server-rounds",
            "model": "model-path",
        }.get(name, name.replace("_", "-"))
        flat[key] = value
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        flat[key.strip()] = parse_value(value.strip())
    for item in getattr(args, "opt", None) or []:
        if "=" not in item:
            raise UsageError(f"--opt {item!r}: expected OPTION=VALUE")
        key, value = item.split("=", 1)
        flat[f"method-{key.strip()}"] = parse_value(value.strip())
    return flat


def _config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from None
    return dict(data.get("config", data))


def build_config(
    args: argparse.Namespace, base: dict[str, Any] | None = None
) -> ResolvedConfig:
    """Merge saved config, config file and flags into the run's resolved config."""
    flat = dict(base or {})
    overrides = {**_config_file(getattr(args, "config", None)), **_overrides(args)}
    if "method" in overrides and overrides["method"] != flat.get("method"):
        # a saved run's options belong to its own method
        flat = {k: v for k, v in flat.items() if not k.startswith("method-")}
    flat.update(overrides)
    if getattr(args, "out", None):
        flat["out-dir"] = str(args.out)
    cfg = RunConfig.from_flat(flat)
    _check_method(cfg.method)
    if cfg.data_dir:
        from fed_unlearn.data import load_data_dir

        load_data_dir(cfg.data_dir, cfg.num_clients)  # raises DataFormatError early
    if cfg.model_path and not (Path(cfg.model_path) / "config.json").is_file():
        raise UsageError(
            f"--model {cfg.model_path}: not a Hugging Face model directory"
        )
    return cfg.resolved()  # once: the run reads this frozen form from here on


def _check_method(name: str) -> None:
    from fed_unlearn.methods import METHOD_REGISTRY

    if name not in METHOD_REGISTRY:
        raise UsageError(
            f"--method: unknown method {name!r}; "
            f"known: {', '.join(sorted(METHOD_REGISTRY))}"
        )


def _fresh_out(path: Path, force: bool) -> None:
    if (path / "run.json").exists() and not force:
        raise UsageError(
            f"--out {path} already holds a run; choose a new directory or pass --force"
        )


def _saved_config(run_dir: Path) -> dict[str, Any]:
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise UsageError(f"{run_dir}: no run.json (not a fed-unlearn run directory)")
    try:
        return dict(json.loads(run_json.read_text())["config"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise UsageError(f"{run_json}: unreadable ({exc})") from None


def print_table(run: dict[str, Any]) -> None:
    """Print the results table (rich) of a finished run."""
    from rich.console import Console
    from rich.table import Table

    from simulations.runner import SUMMARY_COLUMNS

    summary = run.get("summary")
    console = Console()
    if not summary:
        console.print("[bold]no evaluation in this run[/bold]")
        return
    table = Table(
        title=f"fed-unlearn: method {run.get('method')}, departed {run.get('departed')}"
    )
    table.add_column("metric")
    names = [n for n in ("original", "unlearned", "retrain") if n in summary]
    for name in names:
        table.add_column(
            name if name != "unlearned" else f"{run.get('method')}", justify="right"
        )
    for col in SUMMARY_COLUMNS:
        table.add_row(col, *[_fmt(summary[n].get(col)) for n in names])
    phase = {"original": "train", "unlearned": "unlearn", "retrain": "retrain"}
    # the cost of each phase: without the simulation's per-round curve
    # evaluation (a measurement the server makes on data it holds), as the bench
    walls = run["wall_time_s"].get("excl_curve_eval") or run["wall_time_s"]
    table.add_row("wall time (s)", *[_fmt(walls.get(phase[n])) for n in names])
    table.caption = "wall time: without the per-round curve evaluation"
    table.add_row(
        "MB on the wire",
        *[
            _fmt((run["bytes"].get(phase[n]) or {}).get("total", 0) / 1e6)
            for n in names
        ],
    )
    console.print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
    return str(v)


def cmd_run(
    args: argparse.Namespace, steps: tuple[str, ...], base: dict[str, Any] | None = None
) -> int:
    """``run`` / ``train`` / ``unlearn``."""
    from simulations.runner import run_all

    cfg = build_config(args, base)
    out = Path(args.out)
    _fresh_out(out, args.force)
    run = run_all(cfg, out, steps, do_eval=not args.no_eval, progress=not args.quiet)
    print_table(run)
    print(f"results: {out}/run.json, {out}/TOFU_SUMMARY.json")
    if run.get("summary"):
        from fed_unlearn.report import write_report

        report = write_report([out], out / "report")
        print(f"report: {report}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """``forget RUN --client ID``: one departure from a saved federation.

    No FL runs: the departure starts from the federation's current adapter (the
    trained one, or the last departure's), clients forgotten before stay out,
    and on success the federation records this client as forgotten.
    """
    from simulations.runner import run_all

    run_dir = Path(args.run_dir)
    fed = run_dir / "federation"
    if not (fed / "phase.json").is_file():
        raise UsageError(
            f"{run_dir}: no federation/ (it is made by `fed-unlearn train --out "
            f"{run_dir}`)"
        )
    base = _saved_config(run_dir)
    # one request: a saved run's sequential setting does not apply here
    cfg = build_config(args, {**base, "depart": str(args.client), "sequential": False})
    if cfg.fl_key(()) != RunConfig.from_flat(base).fl_key(()):
        raise UsageError(
            "forget keeps the federation's FL settings; --set may change only "
            "evaluation keys, key files and method options"
        )
    out = Path(args.out)
    _fresh_out(out, args.force)
    run = run_all(
        cfg,
        out,
        ("train", "unlearn"),
        do_eval=not args.no_eval,
        progress=not args.quiet,
        federation=fed,
    )
    print_table(run)
    print(f"results: {out}/run.json; {fed} now forgets {run['forgotten']}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``resume DIR``: finish a run whose server died while unlearning.

    The run's unlearning log (``DIR/unlearn-log``, :mod:`fed_unlearn.journal`)
    holds its command's config and every round that ended; the FL phases come
    from the cache, and the method goes on after the last logged round. A seeded
    run ends with the adapter an uninterrupted one gives.
    """
    from fed_unlearn.journal import KILL_ROUND_KEY, UNLEARN_LOG, UnlearnJournal
    from simulations.runner import run_all

    run_dir = Path(args.run_dir)
    if (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}: the run has finished; nothing to resume")
    journal = UnlearnJournal(run_dir / UNLEARN_LOG)
    head = journal.header()
    if head.get("resume_refusal"):
        raise UsageError(f"{run_dir}: {head['resume_refusal']}")
    try:
        flat = {k: v for k, v in dict(head["config"]).items() if k != KILL_ROUND_KEY}
        steps = tuple(str(s) for s in head["steps"])
        fed = Path(head["federation"]) if head.get("federation") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{journal.root}: a malformed header ({exc})") from None
    cfg = RunConfig.from_flat(flat).resolved()
    done = journal.rounds()
    print(f"resuming {run_dir} after unlearning round {done[-1] if done else 0}")
    run = run_all(
        cfg,
        run_dir,
        steps,
        do_eval=bool(head.get("do_eval", True)) and not args.no_eval,
        progress=not args.quiet,
        federation=fed,
        resume=True,
    )
    print_table(run)
    print(f"results: {run_dir}/run.json")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate DIR``: (re-)evaluate the adapters saved in a run directory."""
    from simulations.runner import evaluate_adapters, write_evals, write_json

    run_dir = Path(args.run_dir)
    cfg = RunConfig.from_flat(_saved_config(run_dir)).resolved()
    from safetensors.torch import load_file

    adapters: dict[str, Any] = {}
    for name in ("original", "unlearned", "retrain"):
        path = run_dir / "adapters" / name / "adapter_model.safetensors"
        if not path.is_file():
            raise UsageError(
                f"{path}: missing adapter (run 'fed-unlearn unlearn' first)"
            )
        # peft's save_pretrained keys are get_peft_model_state_dict's keys
        adapters[name] = load_file(str(path))
    results = evaluate_adapters(cfg, adapters)
    run = json.loads((run_dir / "run.json").read_text())
    run["summary"] = write_evals(run_dir, results)
    if cfg.eval_attribution:
        from simulations.runner import attribution_adapters

        run["attribution"] = attribution_adapters(cfg, adapters)
    write_json(run_dir / "run.json", run)
    print_table(run)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``audit relearn DIR``: the two-scenario relearning audit of a run."""
    from simulations.audit import AuditError, audit_run_dir

    run_dir = Path(args.run_dir)
    try:
        audit, path = audit_run_dir(
            run_dir,
            steps=args.steps,
            rounds=args.rounds,
            out=Path(args.out) if args.out else None,
        )
    except AuditError as exc:
        raise UsageError(str(exc)) from None
    for name, scenario in (
        ("benign", audit["benign"]),
        ("adversarial", audit["adversarial"]),
    ):
        if scenario is None:
            continue
        print(
            f"{name:12s} recovery ratio {_fmt(scenario['recovery_ratio'])} "
            f"(retrain oracle {_fmt(scenario['recovery_ratio_retrain'])}), "
            f"relearn gap {_fmt(scenario['relearn_gap'])}"
        )
    print(f"relearning audit: {path}")
    if args.out is None and (run_dir / "report").is_dir():
        from fed_unlearn.report import write_report

        print(f"report: {write_report([run_dir], run_dir / 'report')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``report DIR [DIR ...] --out REPORT_DIR``: markdown + HTML + PNG report."""
    from fed_unlearn.report import write_report

    try:
        path = write_report(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"report: {path} and {Path(path).with_suffix('.html')}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``bench SUITE --out DIR``: methods x scenarios x seeds, mean and 95 % CI."""
    from simulations import bench

    if args.list:
        for name in bench.list_suites():
            print(f"  {name:12s} {bench.load_suite(name).description}")
        return 0
    if not args.suite or not args.out:
        raise UsageError("bench needs SUITE and --out DIR (or --list)")
    try:
        suite = bench.load_suite(args.suite)
        suite = bench.select(
            suite,
            [m for m in (args.methods or "").split(",") if m],
            [int(x) for x in (args.seeds or "").split(",") if x],
            [x for x in (args.scenarios or "").split(",") if x],
        )
    except ValueError as exc:  # SuiteError, or a --seeds entry that is no int
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    bench.run_suite(suite, out, progress=not args.quiet)
    print(f"bench {suite.name}: {out}/report.md, {out}/results.json")
    if args.publish:
        whole = bench.load_suite(args.suite)
        print(f"published: {bench.publish(whole, out)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """``deploy demo --out DIR``: TLS + authenticated SuperNodes on loopback."""
    from simulations.deployment import DeploymentError
    from simulations.secure import run_demo

    if args.clients < 2:
        raise UsageError("--clients: at least 2 SuperNodes (one departs)")
    out = Path(args.out)
    if (out / "demo.json").exists() and not args.force:
        raise UsageError(
            f"--out {out} already holds a demo; choose a new directory or --force"
        )
    methods = args.method or ["foul_server", "mpu"]
    for m in methods:
        _check_method(m)
    extra: dict[str, Any] = {}
    for item in args.set or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        extra[key.strip()] = parse_value(value.strip())
    t0 = time.time()
    try:
        summary = run_demo(
            out,
            clients=args.clients,
            methods=methods,
            rounds=args.rounds,
            seed=args.seed,
            depart=args.depart,
            proxy=not args.no_proxy,
            extra=extra,
        )
    except DeploymentError as exc:
        print(f"fed-unlearn: error: {exc}", file=sys.stderr)
        print(f"logs: {out}/demo.log, {out}/logs/", file=sys.stderr)
        return 1
    for rec in summary["steps"]:
        print(f"  {rec['step']:22s} {rec['seconds']:7.1f} s")
    print(f"demo finished in {time.time() - t0:.0f} s: {out}/demo.json")
    return 0


def cmd_methods(_args: argparse.Namespace) -> int:
    """``methods``: list registered methods, one line each."""
    from fed_unlearn.losses import list_losses
    from fed_unlearn.methods import list_methods

    print("methods (--method NAME, options with --opt KEY=VALUE):")
    for name, summary, reqs in list_methods():
        needs = f" [needs: {', '.join(reqs)}]" if reqs else ""
        print(f"  {name:14s} {summary}{needs}")
    print("inner losses (--opt inner_loss=NAME for mpu / local_unlearn):")
    for name, summary in list_losses():
        print(f"  {name:14s} {summary}")
    return 0


def _add_run_flags(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--preset", choices=None, help="smollm2 (default) | tiny")
    p.add_argument(
        "--model",
        help="local Hugging Face causal-LM directory (overrides the preset's model)",
    )
    p.add_argument(
        "--data-dir",
        help="directory of client_<i>.jsonl files (default: synthetic data)",
    )
    p.add_argument("--clients", type=int, help="number of clients (default: 3)")
    p.add_argument("--depart", help="comma-separated departing client ids (default: 2)")
    p.add_argument(
        "--sequential",
        action="store_true",
        default=None,
        help="the --depart clients leave one after another, in that order, each "
        "its own request (default: together, one request)",
    )
    p.add_argument("--method", help="unlearning method (see 'fed-unlearn methods')")
    p.add_argument("--rounds", type=int, help="FL rounds (default: preset)")
    p.add_argument("--seed", type=int, help="run seed (default: 0)")
    p.add_argument("--aggregation", help="fedavg (default) | product_svd")
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--config", help="TOML file of flat hyphenated config keys")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key (repeatable)",
    )
    p.add_argument(
        "--opt",
        action="append",
        metavar="OPTION=VALUE",
        help="an option of the unlearning method, e.g. --opt kappa=0.5 (repeatable)",
    )
    p.add_argument("--out", required=out_required, help="run directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow writing into a directory holding a run",
    )
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    ap = argparse.ArgumentParser(
        prog="fed-unlearn", description=__doc__.splitlines()[0]
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser(
        "run", help="FL -> departure -> unlearning -> retrain oracle -> evaluation"
    )
    _add_run_flags(p_run)
    p_train = sub.add_parser(
        "train", help="federated LoRA training only (cached by config hash)"
    )
    _add_run_flags(p_train)
    p_un = sub.add_parser(
        "unlearn", help="unlearn from a saved run (reuses its cached FL phase)"
    )
    p_un.add_argument("run_dir")
    _add_run_flags(p_un)
    p_fg = sub.add_parser(
        "forget",
        help="a member asks to be forgotten: unlearn it from a trained federation",
    )
    p_fg.add_argument("run_dir", help="a `fed-unlearn train` run (its federation/)")
    p_fg.add_argument("--client", type=int, required=True, help="the client to forget")
    p_fg.add_argument("--method", help="unlearning method (default: the run's)")
    p_fg.add_argument("--opt", action="append", metavar="OPTION=VALUE")
    p_fg.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="evaluation or key files"
    )
    p_fg.add_argument("--out", required=True, help="run directory of this departure")
    p_fg.add_argument("--force", action="store_true")
    p_fg.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p_fg.add_argument("--quiet", action="store_true", help="no progress bars")
    p_rs = sub.add_parser(
        "resume", help="finish a run whose server died while unlearning"
    )
    p_rs.add_argument("run_dir", help="the run's --out directory")
    p_rs.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p_rs.add_argument("--quiet", action="store_true", help="no progress bars")
    p_ev = sub.add_parser("evaluate", help="evaluate the adapters of a run directory")
    p_ev.add_argument("run_dir")
    p_au = sub.add_parser("audit", help="audits of a finished run directory")
    ausub = p_au.add_subparsers(dest="audit_cmd", required=True)
    p_rl = ausub.add_parser(
        "relearn",
        help="relearning audit: benign FL rounds and an adversarial attack",
    )
    p_rl.add_argument("run_dir", help="a `fed-unlearn run` / `unlearn` directory")
    p_rl.add_argument(
        "--steps",
        type=int,
        help="adversarial attack steps (default: the run's eval-relearn-steps, "
        "else 25; 0 skips it)",
    )
    p_rl.add_argument(
        "--rounds",
        type=int,
        help="benign FL rounds of the remaining clients (default: the run's "
        "eval-relearn-benign-rounds, else 3; 0 skips them)",
    )
    p_rl.add_argument(
        "--out",
        help="write the JSON here (default: RUN_DIR/relearn.json, which also "
        "updates RUN_DIR/run.json and its report)",
    )
    p_rep = sub.add_parser("report", help="write report.md/.html with plots for runs")
    p_rep.add_argument("run_dirs", nargs="+")
    p_rep.add_argument("--out", required=True, help="report directory")
    sub.add_parser("methods", help="list unlearning methods")
    p_b = sub.add_parser(
        "bench", help="run a suite: methods x scenarios x seeds, mean and 95% CI"
    )
    p_b.add_argument("suite", nargs="?", help="suite name (--list) or .toml path")
    p_b.add_argument("--out", help="bench directory (resumable)")
    p_b.add_argument(
        "--publish", action="store_true", help="also copy the report to docs/results/"
    )
    p_b.add_argument("--list", action="store_true", help="list the shipped suites")
    p_b.add_argument("--methods", help="only these method labels (comma-separated)")
    p_b.add_argument("--seeds", help="only these seeds (comma-separated)")
    p_b.add_argument("--scenarios", help="only these scenarios (comma-separated)")
    p_b.add_argument("--quiet", action="store_true", help="no progress bar")
    p_h = sub.add_parser("history", help="keys of a history store at rest")
    hsub = p_h.add_subparsers(dest="history_cmd", required=True)
    p_k = hsub.add_parser("new-key", help="write a fresh history key file (0600)")
    p_k.add_argument("path", help="key file to create (refused if it exists)")
    p_rk = hsub.add_parser(
        "rekey", help="re-encrypt a history store (or encrypt or decrypt it)"
    )
    p_rk.add_argument("store", help="history store directory")
    p_rk.add_argument(
        "--old-key-file", help="its current key (default: none, a plaintext store)"
    )
    p_rk.add_argument(
        "--new-key-file", help="the key from now on (default: none, decrypt it)"
    )
    p_r = sub.add_parser("receipt", help="signing keys and verification of receipts")
    rsub = p_r.add_subparsers(dest="receipt_cmd", required=True)
    p_rn = rsub.add_parser("new-key", help="write an Ed25519 signing key and KEY.pub")
    p_rn.add_argument("path", help="private key file to create")
    p_rv = rsub.add_parser("verify", help="check a receipt's signature and hashes")
    p_rv.add_argument("file", help="receipt.json")
    p_rv.add_argument("--public-key", help="the signer's KEY.pub you trust")
    p_rv.add_argument("--adapter", help="the unlearned adapter (directory)")
    p_rv.add_argument("--adapter-before", help="the trained adapter (directory)")
    p_rv.add_argument("--history", help="the history store the unlearning read")
    p_rv.add_argument("--history-key-file", help="its key, when it is encrypted")
    p_d = sub.add_parser(
        "deploy", help="secure cross-silo federation on loopback (TLS + node auth)"
    )
    p_d.add_argument("action", choices=["demo"])
    p_d.add_argument("--out", required=True, help="demo directory")
    p_d.add_argument("--clients", type=int, default=2, help="SuperNodes (default 2)")
    p_d.add_argument(
        "--method",
        action="append",
        help="unlearning method, one flwr run each (repeatable; "
        "default: foul_server then mpu)",
    )
    p_d.add_argument("--rounds", type=int, default=1, help="FL rounds (default 1)")
    p_d.add_argument("--seed", type=int, default=0)
    p_d.add_argument("--depart", default="1", help="departing client ids")
    p_d.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="more run-config keys"
    )
    p_d.add_argument(
        "--no-proxy",
        action="store_true",
        help="SuperNodes connect to the SuperLink port directly (no Fleet-only proxy)",
    )
    p_d.add_argument("--force", action="store_true", help="reuse a demo directory")
    return ap


def cmd_receipt(args: argparse.Namespace) -> int:
    """``fed-unlearn receipt new-key|verify``."""
    from fed_unlearn.history import HistoryStore, load_key
    from fed_unlearn.receipt import ReceiptError, new_signing_key, verify_receipt

    if args.receipt_cmd == "new-key":
        public = new_signing_key(args.path)
        print(f"wrote {args.path} (keep it private) and {args.path}.pub ({public})")
        return 0
    try:
        receipt = json.loads(Path(args.file).read_text(encoding="utf-8"))
        if not isinstance(receipt, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ReceiptError(f"{args.file}: cannot read the receipt ({exc})") from exc
    public = None
    if args.public_key:
        try:
            public = Path(args.public_key).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReceiptError(f"{args.public_key}: cannot read ({exc})") from exc
    history = None
    if args.history:
        history = HistoryStore(args.history, key=load_key(args.history_key_file))
    for line in verify_receipt(
        receipt,
        public_key=public,
        adapter=args.adapter,
        adapter_before=args.adapter_before,
        history=history,
    ):
        print(f"ok: {line}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``fed-unlearn history new-key|rekey``: manage a history store's key."""
    from fed_unlearn.history import key_fingerprint, load_key, new_key, rekey

    if args.history_cmd == "new-key":
        path = Path(args.path)
        key = new_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(
                f"{path} exists; a key file is never overwritten"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key.hex() + "\n")
        print(f"wrote a new history key to {path} (fingerprint {key_fingerprint(key)})")
        return 0
    old = load_key(args.old_key_file, env=False) if args.old_key_file else None
    new = load_key(args.new_key_file, env=False) if args.new_key_file else None
    if old is None and new is None:
        raise UsageError("give --old-key-file, --new-key-file or both")
    store = rekey(args.store, old, new)
    state = f"encrypted (key {key_fingerprint(new)})" if new else "plaintext"
    print(f"{store.root}: {len(store.rounds())} rounds, now {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fed-unlearn``."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("flwr", "ray", "httpx", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # flwr has its own handler
    if not args.verbose:
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fed_unlearn.data import DataFormatError
    from fed_unlearn.history import HistoryError
    from fed_unlearn.journal import JournalError
    from fed_unlearn.methods import MissingRequirementError
    from fed_unlearn.models import ModelLoadError
    from fed_unlearn.numerics import NumericsError
    from fed_unlearn.numerics import mode as numerics_mode
    from fed_unlearn.receipt import ReceiptError
    from server.channel import ChannelError
    from server.pipeline import PipelineError
    from simulations.runner import RunError

    try:
        numerics_mode()  # FED_UNLEARN_NUMERICS holds a mode, or nothing starts
        if args.cmd == "methods":
            return cmd_methods(args)
        if args.cmd == "run":
            return cmd_run(args, ("train", "unlearn"))
        if args.cmd == "train":
            return cmd_run(args, ("train",))
        if args.cmd == "unlearn":
            return cmd_run(
                args, ("train", "unlearn"), base=_saved_config(Path(args.run_dir))
            )
        if args.cmd == "evaluate":
            return cmd_evaluate(args)
        if args.cmd == "resume":
            return cmd_resume(args)
        if args.cmd == "forget":
            return cmd_forget(args)
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "audit":
            return cmd_audit(args)
        if args.cmd == "bench":
            return cmd_bench(args)
        if args.cmd == "history":
            return cmd_history(args)
        if args.cmd == "receipt":
            return cmd_receipt(args)
        if args.cmd == "deploy":
            return cmd_deploy(args)
    except (UsageError, ConfigError, DataFormatError, NumericsError) as exc:
        print(f"fed-unlearn: error: {exc}", file=sys.stderr)
        return 2
    except (
        RunError,
        ModelLoadError,
        HistoryError,
        JournalError,
        MissingRequirementError,
        PipelineError,
        ChannelError,
        ReceiptError,
    ) as exc:
        print(f"fed-unlearn: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
