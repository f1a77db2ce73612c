r"""Run the app on a local Flower Deployment Engine (SuperLink + SuperNodes, loopback).

This is the cross-silo setting on one machine: one ``flower-supernode`` process per
organisation, each started with its own ``partition-id`` (and optionally its own
``data-path``), a ``flower-superlink`` in insecure mode (loopback only: use TLS and
node authentication across organisations), and ``flwr run . NAME`` with the SuperLink
connection in ``$FLWR_HOME/config.toml``. Every process is stopped at the end.

Usage::

    python -m simulations.deployment --clients 2 \\
        --run-config "preset='tiny' num-clients=2 depart='1' out-dir='runs/deploy'"
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _wait_port(port: int, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local_deployment(
    num_clients: int,
    run_config: str,
    workdir: Path | None = None,
    data_paths: list[str] | None = None,
    timeout: float = 900.0,
) -> tuple[int, str]:
    """Start a SuperLink and ``num_clients`` SuperNodes, ``flwr run`` the app, stop all.

    Parameters
    ----------
    num_clients : int
        SuperNodes to start (partition ids 0..N-1).
    run_config : str
        ``--run-config`` overrides for ``flwr run``.
    workdir : Path, optional
        Where logs, the SuperLink database and ``FLWR_HOME`` go (temp dir if None).
    data_paths : list[str], optional
        One JSONL file per SuperNode (its ``data-path`` node config).
    timeout : float
        Seconds allowed for the run.

    Returns
    -------
    tuple[int, str]
        Exit status of ``flwr run`` and its output.
    """
    work = Path(workdir or tempfile.mkdtemp(prefix="fed_unlearn_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr_home"
    home.mkdir(exist_ok=True)
    http_port = _free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deployment"\n\n'
        "[superlink.local-deployment]\n"
        f'address = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    # The SuperLink/SuperNode spawn flower-superexec etc. from PATH: put ours first.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        log = open(work / "superlink.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--port",
                    str(http_port),
                    "--database",
                    str(work / "state.db"),
                ],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait_port(http_port, 60)
        for i in range(num_clients):
            node_cfg = f"partition-id={i}"
            if data_paths:
                node_cfg += f" data-path='{data_paths[i]}'"
            log = open(work / f"supernode{i}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{http_port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        node_cfg,
                    ],
                    cwd=work,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(ROOT),
                "local-deployment",
                "--run-config",
                run_config,
                "--stream",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return proc.returncode, proc.stdout + proc.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--run-config", default="preset='tiny' num-clients=2 depart='1'")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data-path", action="append", help="one JSONL per SuperNode")
    args = ap.parse_args(argv)
    rc, out = run_local_deployment(
        args.clients,
        args.run_config,
        Path(args.workdir) if args.workdir else None,
        args.data_path,
    )
    print(out[-5000:])
    return rc


if __name__ == "__main__":
    sys.exit(main())
