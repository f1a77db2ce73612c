r"""Run the app on a local Flower Deployment Engine (SuperLink + SuperNodes, loopback).

This is the cross-silo setting on one machine: one ``flower-supernode`` process per
organisation, each started with its own ``partition-id`` (and optionally its own
``data-path``), a ``flower-superlink`` in insecure mode (loopback only: use TLS and
node authentication across organisations, :mod:`simulations.secure`), and
``flwr run . NAME`` with the SuperLink connection in ``$FLWR_HOME/config.toml``.
Every process is stopped at the end.

:class:`Processes` is the process management both paths share: every process is
started in its own process group, logs to its own file, and :meth:`Processes.stop`
stops it *and every descendant* (the SuperLink and the SuperNodes start
``flower-superexec`` in new sessions of their own, which a process-group signal
does not reach).

Usage::

    python -m simulations.deployment --clients 2 \\
        --run-config "preset='tiny' num-clients=2 depart='1' out-dir='runs/deploy'"
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class DeploymentError(RuntimeError):
    """A process of the local federation failed to start, or a step failed."""


def wait_port(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on ``127.0.0.1:port``.

    Parameters
    ----------
    port : int
        Port to poll.
    timeout : float
        Seconds to wait.
    proc : subprocess.Popen, optional
        The process expected to listen; if it exits first, fail at once.

    Raises
    ------
    DeploymentError
        If nothing listens after ``timeout`` seconds, or ``proc`` exited.
    """
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(
                f"{Path(str(proc.args[0])).name} exited with status {proc.returncode} "
                f"before listening on 127.0.0.1:{port}"
            )
        time.sleep(0.3)
    raise DeploymentError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


_wait_port = wait_port  # backwards-compatible name


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_free_port = free_port


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: ``FLWR_HOME``, our venv first on PATH.

    The SuperLink and SuperNodes spawn ``flower-superexec`` from PATH, so the venv's
    ``bin`` must come first.  Telemetry and the update check are switched off.
    """
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": path,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


#: Environment variable marking the processes a :class:`Processes` started.
TOKEN_ENV = "FED_UNLEARN_PROCESSES"


class Processes:
    """Start processes in their own process groups; stop them and their children.

    Use as a context manager: leaving the block (normally, by an exception, or by
    ``KeyboardInterrupt``) stops everything started through :meth:`start`.

    Parameters
    ----------
    workdir : Path
        Where the per-process log files go.
    env : Mapping[str, str]
        Environment of every process.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = Path(workdir)
        # a marker every started process and its descendants inherit, so that
        # stop() also finds a child started in a session of its own after its
        # parent died (reparented, no longer a descendant)
        self.token = secrets.token_hex(8)
        self.env = {**env, TOKEN_ENV: self.token}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(
        self, name: str, argv: Sequence[str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name`` (log in ``workdir/NAME.log``, new session)."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - see stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd or self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and its descendants at once (a crashed host)."""
        import psutil

        try:
            root = psutil.Process(self.procs[name].pid)
            victims = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        _sigkill(victims)

    def kill_when_logged(
        self, name: str, text: str, poll: float = 0.2
    ) -> threading.Thread:
        """SIGKILL ``name`` once its log holds ``text``; return the watcher thread."""

        def watch() -> None:
            path = self.log_path(name)
            while self.procs[name].poll() is None:
                if path.is_file() and text in path.read_text(errors="replace"):
                    self.kill(name)
                    return
                time.sleep(poll)

        thread = threading.Thread(target=watch, name=f"kill-{name}", daemon=True)
        thread.start()
        return thread

    def log_path(self, name: str) -> Path:
        """Path of the log file of process ``name``."""
        return self.workdir / f"{name}.log"

    def pids(self) -> set[int]:
        """Pids of the started processes and of all their live descendants."""
        import psutil

        pids: set[int] = set()
        for proc in self.procs.values():
            try:
                p = psutil.Process(proc.pid)
                pids.add(p.pid)
                pids.update(c.pid for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every started process group and descendant, then SIGKILL.

        Safe to call more than once.
        """
        import psutil

        survivors: list[psutil.Process] = []
        for pid in self.pids():
            try:
                survivors.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        # Own process groups first (they were started with start_new_session) ...
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # ... then any descendant that lives in a session of its own.
        for p in survivors:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(survivors, timeout=grace)
        _sigkill(alive)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for _ in range(3):
            strays = self._marked()
            if not strays:
                break
            _sigkill(strays)
            time.sleep(0.5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _marked(self) -> list[Any]:
        """Live processes carrying this instance's marker (any parent)."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "status"]):
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if p.environ().get(TOKEN_ENV) == self.token:
                    found.append(p)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found


def _sigkill(procs: Sequence[Any]) -> None:
    """SIGKILL each of ``procs`` (psutil processes; gone ones skipped), then reap."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=5)


def write_cli_config(
    home: Path, name: str, address: str, root_certificates: Path | None = None
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name``.

    Parameters
    ----------
    home : Path
        ``FLWR_HOME``.
    name : str
        Connection name (``flwr run APP NAME``).
    address : str
        ``host:port`` of the SuperLink (Control API).
    root_certificates : Path, optional
        CA certificate; without it the connection is insecure (plain HTTP).
    """
    home.mkdir(parents=True, exist_ok=True)
    tls = (
        f'root-certificates = "{Path(root_certificates).resolve()}"\n'
        if root_certificates
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\n{tls}'
    )


def flwr_run(
    connection: str,
    run_config: str,
    env: Mapping[str, str],
    timeout: float,
) -> tuple[int, str]:
    """``flwr run ROOT CONNECTION --run-config ... --stream``; return (status, output).

    A run that outlives ``timeout`` returns status 124 and what it printed.
    """
    try:
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(ROOT),
                connection,
                "--run-config",
                run_config,
                "--stream",
            ],
            cwd=ROOT,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        return 124, text + f"\nflwr run: timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def run_local_deployment(
    num_clients: int,
    run_config: str,
    workdir: Path | None = None,
    data_paths: list[str] | None = None,
    timeout: float = 900.0,
    kill: tuple[int, str] | None = None,
) -> tuple[int, str]:
    """Start a SuperLink and ``num_clients`` SuperNodes, ``flwr run`` the app, stop all.

    Insecure (plain HTTP): loopback tests only.  The TLS + SuperNode-authentication
    variant is :func:`simulations.secure.run_demo`.

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
    kill : tuple[int, str], optional
        Fault injection: ``(i, text)`` SIGKILLs SuperNode ``i`` and its ClientApp
        processes once its log holds ``text`` (for example ``"Receiving: train
        message"``: mid-round, while it trains).

    Returns
    -------
    tuple[int, str]
        Exit status of ``flwr run`` and its output.
    """
    work = Path(workdir or tempfile.mkdtemp(prefix="fed_unlearn_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr_home"
    http_port = free_port()
    write_cli_config(home, "local-deployment", f"127.0.0.1:{http_port}")
    env = flwr_env(home)
    try:
        with Processes(work, env) as procs:
            link = procs.start(
                "superlink",
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--port",
                    str(http_port),
                    "--database",
                    str(work / "state.db"),
                ],
            )
            wait_port(http_port, 60, link)
            for i in range(num_clients):
                node_cfg = f"partition-id={i}"
                if data_paths:
                    node_cfg += f" data-path='{data_paths[i]}'"
                procs.start(
                    f"supernode{i}",
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{http_port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_cfg,
                    ],
                )
            if kill is not None:
                procs.kill_when_logged(f"supernode{kill[0]}", kill[1])
            return flwr_run("local-deployment", run_config, env, timeout)
    finally:
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
