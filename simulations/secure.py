r"""Secure cross-silo federation on loopback: TLS + authenticated SuperNodes.

``fed-unlearn deploy demo --out DIR`` (:func:`run_demo`) does, on one machine, what
a coordinator and N member organisations do across the internet:

1. :func:`make_credentials` creates a private CA, the SuperLink's certificate
   (SAN ``DNS:localhost``, ``IP:127.0.0.1``, ``IP:::1``) and one ECDSA P-384 key
   pair per SuperNode (OpenSSH format), with the ``cryptography`` package; private
   keys are written with mode 0600 and the CA key is never written.
2. :class:`SecureFederation` starts ``flower-superlink`` with TLS and
   ``--enable-supernode-auth`` bound to 127.0.0.1, registers every SuperNode's
   public key (``flwr supernode register``), starts the Fleet-only proxy
   (:mod:`simulations.fleet_proxy`, the Control-API mitigation) and N
   ``flower-supernode`` processes that connect *through the proxy*, each with the CA
   certificate, its own private key and its own data file (node config
   ``partition-id=i data-path=DIR/data/client_i.jsonl``).
3. ``flwr run`` once per method (FL -> departure -> unlearning -> retrain ->
   federated evaluation, the ServerApp of ``server/server_app.py``); the FL phase is
   cached by config hash under ``FED_UNLEARN_RUNS=DIR/runs``, so the second method
   reuses it.
4. ``DIR/demo.json`` (steps, timings, outputs) and ``DIR/demo.log``; every process
   is stopped at the end, on failure and on SIGINT/SIGTERM.

:func:`probe_control_api` measures what a party holding no credential (only the
public CA certificate, or none at all) can do against an address.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from simulations.deployment import (
    BIN,
    DeploymentError,
    Processes,
    flwr_env,
    flwr_run,
    free_port,
    wait_port,
    write_cli_config,
)

log = logging.getLogger("fed_unlearn.deploy")

CONNECTION = "secure"
#: The "2004" failure a SuperNode logs when its key is not registered.
UNREGISTERED_MARKER = "Failed to activate SuperNode"


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Credentials:
    """Paths of the generated certificates and keys.

    Attributes
    ----------
    ca_cert : Path
        The CA certificate (public: every SuperNode and CLI user gets it).
    server_cert, server_key : Path
        The SuperLink's certificate and private key (0600).
    node_keys : list[Path]
        SuperNode private keys (OpenSSH, 0600); the public key is ``KEY.pub``.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)

    def public_key(self, i: int) -> Path:
        """Path of SuperNode ``i``'s public key."""
        return self.node_keys[i].with_suffix(".pub")


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0600 (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def node_key_pair(private_path: Path) -> Path:
    """Generate an ECDSA P-384 key pair in OpenSSH format for one SuperNode.

    Parameters
    ----------
    private_path : Path
        Where the private key goes (0600); the public key goes to ``.pub`` beside.

    Returns
    -------
    Path
        The public key's path.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_secret(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = private_path.with_suffix(".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return pub


def make_credentials(
    out: Path, num_nodes: int, hostnames: Sequence[str] = ("localhost",)
) -> Credentials:
    """Create a CA, the SuperLink certificate and ``num_nodes`` SuperNode key pairs.

    ECDSA P-384 throughout.  The CA signs the server certificate and is then
    discarded (its key is never written): issuing another certificate means a new
    CA, which every member must be given again.

    Parameters
    ----------
    out : Path
        Directory; ``certs/`` and ``keys/`` are created in it.
    num_nodes : int
        SuperNode key pairs to create (``keys/supernode_<i>``, ``.pub``).
    hostnames : Sequence[str]
        DNS names in the server certificate's SAN, beside ``127.0.0.1`` and ``::1``.

    Returns
    -------
    Credentials
        The paths.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Path(out) / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fed-unlearn federation"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"fed-unlearn CA {secrets.token_hex(4)}"
            ),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.DNSName(h) for h in hostnames] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
        )
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    (certs / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (certs / "server.pem").write_bytes(srv_cert.public_bytes(pem))
    _write_secret(
        certs / "server.key",
        srv_key.private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    keys = Path(out) / "keys"
    node_keys = []
    for i in range(num_nodes):
        node_key_pair(keys / f"supernode_{i}")
        node_keys.append(keys / f"supernode_{i}")
    return Credentials(
        certs / "ca.crt", certs / "server.pem", certs / "server.key", node_keys
    )


# ----------------------------------------------------------------- the federation


def flwr_cli(
    args: Sequence[str], env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` (our venv's) and return the completed process."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    """Parse ``flwr ... --format json`` output (the JSON object in stdout).

    flwr 1.41 and 1.42 exit 0 even when the call failed; it then prints
    ``{"success": false, "error-message": ...}``, which raises here.
    """
    text = proc.stdout
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise DeploymentError(
            f"flwr {' '.join(map(str, proc.args[1:]))}: no JSON in output: "
            f"{(proc.stdout + proc.stderr)[-800:]}"
        )
    data = json.loads(text[start:])
    if isinstance(data, dict) and data.get("success") is False:
        raise DeploymentError(
            f"flwr {' '.join(map(str, proc.args[1:]))}: "
            f"{data.get('error-message', data)}"
        )
    return data


class SecureFederation:
    """A TLS SuperLink with SuperNode authentication and N SuperNodes, on loopback.

    Use as a context manager; every process is stopped when the block is left.

    Parameters
    ----------
    workdir : Path
        Logs (``logs/``), the SuperLink database, ``flwr_home/``.
    creds : Credentials
        From :func:`make_credentials`.
    proxy : bool
        Start the Fleet-only proxy and connect the SuperNodes through it (the
        Control-API mitigation).  Without it, SuperNodes use the SuperLink's port.
    env : dict[str, str], optional
        Extra environment of the SuperLink (and so of the ServerApp).
    """

    def __init__(
        self,
        workdir: Path,
        creds: Credentials,
        proxy: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.creds = creds
        self.use_proxy = proxy
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proxy_port = free_port() if proxy else None
        write_cli_config(self.home, CONNECTION, f"127.0.0.1:{self.port}", creds.ca_cert)
        self.env = {**flwr_env(self.home), **(env or {})}
        self.procs = Processes(self.logs, self.env)
        self.node_ids: dict[int, int] = {}

    # -- addresses
    @property
    def address(self) -> str:
        """The SuperLink's own address (Control + Fleet + Runtime, loopback)."""
        return f"127.0.0.1:{self.port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the proxy if any, else the SuperLink."""
        return f"127.0.0.1:{self.proxy_port or self.port}"

    def __enter__(self) -> SecureFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process started (idempotent)."""
        self.procs.stop()

    # -- steps
    def start_superlink(self, timeout: float = 90.0) -> None:
        """Start ``flower-superlink`` with TLS and SuperNode auth on 127.0.0.1."""
        c = self.creds
        proc = self.procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(c.ca_cert),
                "--ssl-certfile",
                str(c.server_cert),
                "--ssl-keyfile",
                str(c.server_key),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.workdir / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_port(self.port, timeout, proc)
        self._wait_healthy(self.port, timeout, proc)

    def _wait_healthy(
        self, port: int, timeout: float, proc: subprocess.Popen[bytes]
    ) -> None:
        import httpx

        t0 = time.time()
        last: object = None
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{Path(str(proc.args[0])).name} exited with status "
                    f"{proc.returncode}; see {self.logs}"
                )
            try:
                r = httpx.get(
                    f"https://127.0.0.1:{port}/health",
                    verify=ssl.create_default_context(cafile=str(self.creds.ca_cert)),
                    timeout=5,
                )
                if r.status_code < 500:
                    return
                last = r.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise DeploymentError(f"127.0.0.1:{port} not healthy after {timeout} s: {last}")

    def register(self, i: int) -> int:
        """Register SuperNode ``i``'s public key; return its node id."""
        pub = self.creds.public_key(i)
        proc = flwr_cli(
            ["supernode", "register", str(pub), CONNECTION, "--format", "json"],
            self.env,
        )
        if proc.returncode != 0:
            raise DeploymentError(
                f"flwr supernode register {pub} failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr)[-800:]}"
            )
        node_id = int(_json_out(proc)["node-id"])
        self.node_ids[i] = node_id
        return node_id

    def start_proxy(self, timeout: float = 60.0) -> None:
        """Start the Fleet-only TLS proxy in front of the SuperLink."""
        if self.proxy_port is None:
            return
        import sys

        c = self.creds
        proc = self.procs.start(
            "fleet_proxy",
            [
                sys.executable,
                "-m",
                "simulations.fleet_proxy",
                "--listen",
                f"127.0.0.1:{self.proxy_port}",
                "--upstream",
                self.address,
                "--certfile",
                str(c.server_cert),
                "--keyfile",
                str(c.server_key),
                "--ca",
                str(c.ca_cert),
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_port(self.proxy_port, timeout, proc)

    def start_supernode(
        self,
        i: int,
        node_config: str,
        key: Path | None = None,
        insecure: bool = False,
        name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start SuperNode ``i`` (its key, the CA, ``node_config``).

        ``key`` overrides its private key; ``insecure`` starts it in plaintext
        without a key (for the refusal tests).
        """
        argv = [str(BIN / "flower-supernode"), "--superlink", self.fleet_address]
        if insecure:
            argv += ["--insecure"]
        else:
            argv += ["--root-certificates", str(self.creds.ca_cert)]
            argv += [
                "--auth-supernode-private-key",
                str(key or self.creds.node_keys[i]),
            ]
        argv += ["--host", "127.0.0.1", "--port", str(free_port())]
        argv += ["--node-config", node_config]
        return self.procs.start(name or f"supernode{i}", argv)

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` on the SuperLink (as the coordinator)."""
        proc = flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], self.env)
        if proc.returncode != 0:
            raise DeploymentError(
                f"flwr supernode list failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr)[-800:]}"
            )
        data = _json_out(proc)
        nodes = data.get("nodes", data) if isinstance(data, dict) else data
        return list(nodes)

    def wait_online(self, n: int, timeout: float = 180.0) -> list[dict[str, Any]]:
        """Wait until ``n`` SuperNodes are online; fail naming a dead one."""
        t0 = time.time()
        nodes: list[dict[str, Any]] = []
        while time.time() - t0 < timeout:
            for name, proc in self.procs.procs.items():
                if name.startswith("supernode") and proc.poll() is not None:
                    tail = self.procs.log_path(name).read_text(errors="replace")
                    raise DeploymentError(
                        f"{name} exited with status {proc.returncode}: {tail[-600:]}"
                    )
            nodes = self.list_nodes()
            online = [x for x in nodes if str(x.get("status", "")).lower() == "online"]
            if len(online) >= n:
                return nodes
            time.sleep(2)
        raise DeploymentError(
            f"{n} SuperNodes not online after {timeout:.0f} s: {nodes}"
        )


# ---------------------------------------------------------------- control probe


def probe_control_api(
    address: str, ca_cert: Path | None, workdir: Path
) -> dict[str, Any]:
    """Measure what a party with no credential can do against ``address``.

    It holds only the CA certificate (public: every member has it) or nothing
    (``ca_cert=None``: TLS verification off).  Everything it changes it undoes.

    Parameters
    ----------
    address : str
        ``host:port`` (the SuperLink, or the proxy).
    ca_cert : Path, optional
        CA certificate; ``None`` = do not verify the server at all.
    workdir : Path
        Scratch space for the outsider's ``FLWR_HOME`` and key.

    Returns
    -------
    dict[str, Any]
        One entry per probe: HTTP status codes, and for the CLI calls whether they
        succeeded and what they returned.
    """
    import httpx

    home = Path(workdir) / "outsider_home"
    write_cli_config(home, "target", address, ca_cert)
    env = flwr_env(home)
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else False
    )
    base = f"https://{address}"
    res: dict[str, Any] = {"address": address, "ca_cert": bool(ca_cert)}

    def status(method: str, path: str, **kw: Any) -> int | str:
        try:
            return httpx.request(
                method, base + path, verify=verify, timeout=15, **kw
            ).status_code
        except httpx.HTTPError as exc:
            return f"error: {type(exc).__name__}"

    res["GET /docs"] = status("GET", "/docs")
    try:
        spec = httpx.get(base + "/openapi.json", verify=verify, timeout=15)
        res["GET /openapi.json"] = spec.status_code
        if spec.status_code == 200:
            paths = list(spec.json().get("paths", {}))
            res["control_routes_listed"] = sum(
                p.startswith("/v1/control/") for p in paths
            )
    except (httpx.HTTPError, ValueError) as exc:
        res["GET /openapi.json"] = f"error: {type(exc).__name__}"
    # the raw endpoints with an empty protobuf body
    proto = {"content-type": "application/protobuf"}
    res["POST /v1/control/list-runs"] = status(
        "POST", "/v1/control/list-runs", content=b"", headers=proto
    )
    res["POST /v1/control/list-nodes"] = status(
        "POST", "/v1/control/list-nodes", content=b"", headers=proto
    )
    res["POST /v1/control/start-run (empty)"] = status(
        "POST", "/v1/control/start-run", content=b"", headers=proto
    )
    res["POST /v1/runtime/get-nodes"] = status(
        "POST", "/v1/runtime/get-nodes", content=b"", headers=proto
    )
    if ca_cert is None:
        return res
    # the flwr CLI, as anyone would use it
    ls = flwr_cli(["ls", "target", "--format", "json"], env, timeout=60)
    try:
        runs = _json_out(ls)
        res["flwr ls"] = {"ok": True, "runs": len(runs.get("runs", []))}
    except (DeploymentError, ValueError) as exc:
        res["flwr ls"] = {"ok": False, "error": str(exc)[-300:]}
    key = Path(workdir) / "outsider_key"
    node_key_pair(key)
    reg = flwr_cli(
        [
            "supernode",
            "register",
            str(key.with_suffix(".pub")),
            "target",
            "--format",
            "json",
        ],
        env,
        timeout=60,
    )
    entry: dict[str, Any] = {}
    try:
        node_id = int(_json_out(reg)["node-id"])
        entry.update(ok=True, node_id=node_id)
        un = flwr_cli(
            ["supernode", "unregister", str(node_id), "target", "--format", "json"],
            env,
            timeout=60,
        )
        try:
            _json_out(un)
            entry["unregistered_again"] = True
        except (DeploymentError, ValueError):
            entry["unregistered_again"] = False
    except (DeploymentError, ValueError, KeyError) as exc:
        entry.update(ok=False, error=str(exc)[-300:])
    res["flwr supernode register (outsider key)"] = entry
    return res


# ------------------------------------------------------------------------ demo


def write_client_data(cfg_flat: dict[str, Any], out: Path) -> list[Path]:
    """Write each client's partition to ``out/client_<i>.jsonl`` (its data-path).

    The partition is the one the Simulation Engine gives client ``i`` for the same
    config and seed, so both engines train on the same items.
    """
    from clients.task import full_dataset
    from fed_unlearn.config import RunConfig
    from fed_unlearn.data import write_jsonl

    cfg = RunConfig.from_flat(cfg_flat)
    data = full_dataset(cfg)
    return [
        write_jsonl(Path(out) / f"client_{i}.jsonl", data.clients[i])
        for i in range(cfg.num_clients)
    ]


def _run_config(flat: dict[str, Any]) -> str:
    """Render a flat config as ``flwr run --run-config`` (TOML values)."""
    parts = []
    for k, v in flat.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, int | float):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}='{v}'")
    return " ".join(parts)


class _Terminated(Exception):
    """SIGTERM received (turned into an exception so that cleanup runs)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _verify_demo_receipt(run_dir: Path, federation: Path, key: Path) -> list[str]:
    """Verify a forget run's receipt against its adapters and history."""
    from fed_unlearn.history import HistoryStore
    from fed_unlearn.receipt import verify_receipt

    receipt = json.loads((run_dir / "receipt.json").read_text())
    return verify_receipt(
        receipt,
        public_key=Path(f"{key}.pub").read_text().strip(),
        adapter=run_dir / "adapters" / "unlearned",
        adapter_before=run_dir / "adapters" / "original",
        history=HistoryStore(federation / "history"),
    )


def run_demo(
    out: Path,
    clients: int = 2,
    methods: Sequence[str] = ("foul_server", "mpu"),
    rounds: int = 1,
    seed: int = 0,
    depart: str = "1",
    local_epochs: int = 1,
    proxy: bool = True,
    extra: dict[str, Any] | None = None,
    timeout: float = 900.0,
    fail_at: str | None = None,
) -> dict[str, Any]:
    """Run the secure loopback federation end to end and write ``out/demo.json``.

    Parameters
    ----------
    out : Path
        Demo directory (certs, keys, data, logs, runs, outputs).
    clients : int
        SuperNodes (one per organisation).
    methods : Sequence[str]
        Unlearning methods, one ``flwr run`` each (the FL phase is cached).
    rounds, seed, local_epochs : int
        FL rounds, run seed, local epochs.
    depart : str
        Departing client ids (comma-separated).
    proxy : bool
        SuperNodes connect through the Fleet-only proxy (default) or directly.
    extra : dict[str, Any], optional
        More run-config keys (e.g. ``{"method-options": "seed=7"}``).
    timeout : float
        Seconds allowed per ``flwr run``.
    fail_at : str, optional
        Raise :class:`DeploymentError` just before this step (tests of cleanup).

    Returns
    -------
    dict[str, Any]
        The content of ``demo.json``.

    Raises
    ------
    DeploymentError
        Naming the step that failed; every process is stopped first.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "demo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    summary: dict[str, Any] = {
        "dir": str(out),
        "clients": clients,
        "methods": list(methods),
        "proxy": proxy,
        "steps": [],
        "runs": {},
        "ok": False,
    }
    t_all = time.time()
    flat: dict[str, Any] = {
        "preset": "tiny",
        "num-clients": clients,
        "depart": depart,
        "num-server-rounds": rounds,
        "local-epochs": local_epochs,
        "seed": seed,
        **(extra or {}),
    }

    @contextmanager
    def step(name: str) -> Iterator[dict[str, Any]]:
        if fail_at == name:
            raise DeploymentError(f"step {name!r}: failed on request (fail_at)")
        rec: dict[str, Any] = {"step": name}
        log.info("step %s ...", name)
        t0 = time.time()
        try:
            yield rec
        except BaseException as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            rec["seconds"] = round(time.time() - t0, 2)
            summary["steps"].append(rec)
            log.info("step %s: %.1f s", name, rec["seconds"])

    fed: SecureFederation | None = None
    try:
        with _sigterm_raises():
            with step("credentials") as rec:
                creds = make_credentials(out, clients)
                rec["ca_cert"] = str(creds.ca_cert)
                signing_key = out / "keys" / "receipt-signing.key"
                for f in (signing_key, Path(f"{signing_key}.pub")):
                    f.unlink(missing_ok=True)
                signing_key.parent.mkdir(parents=True, exist_ok=True)
                from fed_unlearn.receipt import new_signing_key

                rec["receipt_public_key"] = new_signing_key(signing_key)
            with step("data") as rec:
                paths = write_client_data(flat, out / "data")
                rec["data_paths"] = [str(p) for p in paths]
            (out / "state.db").unlink(missing_ok=True)  # keys of an earlier demo
            fed = SecureFederation(
                out, creds, proxy=proxy, env={"FED_UNLEARN_RUNS": str(out / "runs")}
            )
            with step("superlink") as rec:
                fed.start_superlink()
                rec["address"] = fed.address
            with step("register") as rec:
                rec["node_ids"] = [fed.register(i) for i in range(clients)]
            with step("proxy") as rec:
                fed.start_proxy()
                rec["fleet_address"] = fed.fleet_address
            with step("supernodes") as rec:
                for i in range(clients):
                    fed.start_supernode(i, f"partition-id={i} data-path='{paths[i]}'")
                rec["nodes"] = fed.wait_online(clients)
            with step("run:train") as rec:
                # FL only: the history is kept where it outlives the run
                federation = out / "federation"
                if federation.exists():
                    shutil.rmtree(federation)
                cfg = {
                    **flat,
                    "mode": "train",
                    "federation-dir": str(federation),
                    "out-dir": str(out / "out" / "train"),
                }
                rc, text = flwr_run(CONNECTION, _run_config(cfg), fed.env, timeout)
                (fed.logs / "flwr_run_train.log").write_text(text)
                rec.update(rc=rc, federation=str(federation))
                if rc != 0:
                    raise DeploymentError(
                        f"flwr run (train) exited {rc}: {text[-1500:]}"
                    )
            for method in methods:
                with step(f"run:{method}") as rec:
                    # the member's forget request, a later, separate run; each
                    # method answers the same request on its own copy
                    run_dir = out / "out" / method
                    fed_copy = out / f"federation-{method}"
                    if fed_copy.exists():
                        shutil.rmtree(fed_copy)
                    shutil.copytree(federation, fed_copy)
                    cfg = {
                        **flat,
                        "mode": "forget",
                        "federation-dir": str(fed_copy),
                        "method": method,
                        "out-dir": str(run_dir),
                        "receipt-key-file": str(signing_key),
                    }
                    rc, text = flwr_run(CONNECTION, _run_config(cfg), fed.env, timeout)
                    (fed.logs / f"flwr_run_{method}.log").write_text(text)
                    rec.update(rc=rc, out_dir=str(run_dir))
                    if rc != 0:
                        raise DeploymentError(
                            f"flwr run (method {method}) exited {rc}: {text[-1500:]}"
                        )
                    pipe = json.loads((run_dir / "pipeline.json").read_text())
                    rec["fl_cached"] = bool(pipe["train"].get("cached"))
                    rec["receipt"] = _verify_demo_receipt(
                        run_dir, fed_copy, signing_key
                    )
                    summary["runs"][method] = {
                        "out_dir": str(run_dir),
                        "pipeline": str(run_dir / "pipeline.json"),
                        "federated_eval": str(run_dir / "federated_eval.json"),
                        "adapters": str(run_dir / "adapters"),
                        "log": str(fed.logs / f"flwr_run_{method}.log"),
                        "fl_cached": rec["fl_cached"],
                    }
            if proxy:
                with step("control_probe") as rec:
                    rec["direct"] = probe_control_api(
                        fed.address, creds.ca_cert, out / "probe_direct"
                    )
                    rec["via_proxy"] = probe_control_api(
                        fed.fleet_address, creds.ca_cert, out / "probe_proxy"
                    )
            summary["ok"] = True
    except (KeyboardInterrupt, _Terminated) as exc:
        summary["interrupted"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with step("stop"):
            if fed is not None:
                fed.stop()
        summary["seconds"] = round(time.time() - t_all, 1)
        summary["logs"] = str(out / "logs")
        (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info(
            "demo %s in %.1f s", "ok" if summary["ok"] else "FAILED", summary["seconds"]
        )
        log.removeHandler(handler)
        handler.close()
    return summary
