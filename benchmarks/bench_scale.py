"""Benchmark: how FL and a departure scale with the number of simulated clients.

    python benchmarks/bench_scale.py --clients 10,30,100 --methods foul_server,mpu \\
        --out runs/scale

For each client count N it runs ``fed-unlearn run --preset tiny --clients N``
(Flower's Simulation Engine, client 1 departs) once per method, in a process of
its own, with a private FL cache under ``OUT/cache`` (the methods of one N share
the FL phase and the retrain oracle; nothing of the user's cache is read or
written). While a run goes, the resident memory of its whole process tree (the
driver, Ray's daemons and the ClientApp actors) is sampled every 0.2 s.

Every client holds only its own people and its adapter: the Ray actors load the
frozen tiny base once each and run the clients one after another, so memory grows
with the adapters and the history, not with a model per client.

It writes ``OUT/scale.json``, ``OUT/scale.md`` and ``OUT/scale.png`` with, per N:

- peak RSS of the run's process tree, and the marginal memory per client
  (peak RSS(N) − peak RSS(smallest N)) / (N − smallest N);
- history bytes per round and in total (the server's store grows with clients
  × rounds);
- the FL round time (FL wall time without the per-round curve evaluation, over
  the rounds) and the retrain oracle's;
- per method: the unlearning wall time (without the curve evaluation), its
  server-side seconds where the method records them (``unlearn_info``'s
  ``server_*_seconds``) and its bytes on the wire.

The default federation per client is small (``--people 1``, ``--qa 10``:
10 Q/A items, the synthetic data's fewest per person) so that 100 clients fit these 2 cores; figures belong in the
README or ``docs/results/``, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/statm") as f:
                resident = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        p = int(entry.name)
        rss[p] = resident
        children.setdefault(int(fields[1]), []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_one(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, int, float]:
    """Run ``cmd``; return (exit code, peak tree RSS in bytes, wall seconds)."""
    peak = [0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        code = proc.wait()
        t.join()
    return code, peak[0], time.perf_counter() - t0


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """The scale figures of one ``run.json``."""
    wall = run["wall_time_s"]
    excl = wall.get("excl_curve_eval", {})
    rounds = run["rounds"]
    per_round = run["history"]["bytes_per_round"]
    info = run.get("unlearn_info", {})
    server = sum(
        float(v)
        for k, v in info.items()
        if k.startswith("server_") and k.endswith("_seconds")
    )
    return {
        "fl_round_s": excl.get("train", wall["train"]) / max(1, rounds["train"]),
        "retrain_round_s": excl.get("retrain", wall.get("retrain", 0.0))
        / max(1, rounds.get("retrain", 1)),
        "history_bytes_per_round": per_round,
        "history_bytes": sum(per_round),
        "unlearn_s": excl.get("unlearn", wall.get("unlearn")),
        "server_step_s": server if server else None,
        "unlearn_bytes": run["bytes"]["unlearn"]["total"],
        "unlearn_rounds": rounds.get("unlearn"),
    }


def table(results: dict[str, Any]) -> str:
    """Markdown table of ``results``."""
    rows = [
        "| clients | method | peak RSS (MiB) | MiB / client | history MiB (per round) "
        "| FL round s | unlearn s | server step s | unlearn MB on the wire |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, by in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for method, r in by.items():
            if "error" in r:
                rows.append(f"| {n} | {method} | failed: {r['error']} ||||||| |")
                continue
            per = r["history_bytes_per_round"]
            step = "–" if r["server_step_s"] is None else f"{r['server_step_s']:.3f}"
            mpc = results["mib_per_client"].get(n)
            rows.append(
                f"| {n} | {method} | {r['peak_rss'] / 2**20:.0f} | "
                f"{'–' if mpc is None else f'{mpc:.1f}'} | "
                f"{r['history_bytes'] / 2**20:.1f} ({per[0] / 2**20:.2f}) | "
                f"{r['fl_round_s']:.1f} | {r['unlearn_s']:.1f} | {step} | "
                f"{r['unlearn_bytes'] / 1e6:.1f} |"
            )
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    """Growth curves against N: history size, FL round time, peak RSS, and per
    method the unlearning time, its server-side seconds and its bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(n) for n in results["runs"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("history MiB", lambda r: r["history_bytes"] / 2**20),
        ("FL round s", lambda r: r["fl_round_s"]),
        ("peak RSS MiB", lambda r: r["peak_rss"] / 2**20),
        ("unlearn s", lambda r: r["unlearn_s"]),
        ("server step s", lambda r: r["server_step_s"]),
        ("unlearn MB on the wire", lambda r: r["unlearn_bytes"] / 1e6),
    ]
    methods = sorted({m for by in results["runs"].values() for m in by})
    for ax, (label, get) in zip(axes.flat, panels, strict=True):
        for m in methods:
            xs = [
                n
                for n in ns
                if "error" not in results["runs"][str(n)].get(m, {"error": 1})
                and get(results["runs"][str(n)][m]) is not None
            ]
            ax.plot(xs, [get(results["runs"][str(n)][m]) for n in xs], "o-", label=m)
        ax.set_xlabel("clients")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,30,100", help="comma-separated counts")
    ap.add_argument("--methods", default="foul_server,mpu")
    ap.add_argument("--rounds", type=int, default=2, help="FL rounds")
    ap.add_argument("--people", type=int, default=1, help="people per client")
    ap.add_argument("--qa", type=int, default=10, help="Q/A items per person (10-16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FED_UNLEARN_RUNS": str(out / "cache")}
    exe = Path(sys.executable).with_name("fed-unlearn")
    path = out / "scale.json"
    results: dict[str, Any] = (
        json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    )
    results["settings"] = vars(args)
    for n in (int(x) for x in args.clients.split(",")):
        for method in args.methods.split(","):
            done = results["runs"].get(str(n), {}).get(method)
            if done is not None and "error" not in done:
                continue
            run_dir = out / f"n{n}" / method
            cmd = [
                str(exe), "run", "--preset", "tiny", "--clients", str(n),
                "--depart", "1", "--method", method, "--rounds", str(args.rounds),
                "--seed", str(args.seed), "--set", f"people-per-client={args.people}",
                "--set", f"qa-per-person={args.qa}", "--set", "holdout-people=4",
                "--set", "general-probes=24", "--no-eval", "--quiet", "--force",
                "--out", str(run_dir),
            ]  # fmt: skip
            print(f"N={n} {method} ...", flush=True)
            code, peak, wall = run_one(cmd, env, out / f"n{n}-{method}.log")
            if code != 0:
                entry: dict[str, Any] = {"error": f"exit {code}, see n{n}-{method}.log"}
            else:
                entry = summarise(json.loads((run_dir / "run.json").read_text()))
            entry.update(peak_rss=peak, process_wall_s=wall)
            results["runs"].setdefault(str(n), {})[method] = entry
            path.write_text(json.dumps(results, indent=1))
            print(f"  {json.dumps(entry)}", flush=True)
    ns = sorted(int(n) for n in results["runs"])
    results["mib_per_client"] = {}
    for n in ns[1:]:
        peaks = [
            (
                results["runs"][str(n)][m]["peak_rss"],
                results["runs"][str(ns[0])][m]["peak_rss"],
            )
            for m in results["runs"][str(n)]
            if "error" not in results["runs"][str(n)][m]
            and "error" not in results["runs"][str(ns[0])].get(m, {"error": 1})
        ]
        if peaks:
            results["mib_per_client"][str(n)] = max(
                (a - b) / (n - ns[0]) / 2**20 for a, b in peaks
            )
    path.write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(
        "# Scale: simulated clients on the tiny model\n\n"
        f"Settings: {json.dumps(results['settings'])}\n\n" + table(results) + "\n\n"
        "![growth](scale.png)\n"
    )
    plot(results, out / "scale.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
