"""Secure loopback federation: TLS, authenticated SuperNodes, Fleet-only proxy.

The refusal tests start a SuperLink and one SuperNode, no ML (no ``flwr run``).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _leftovers(home: Path) -> list[str]:
    """Live processes whose environment names ``home`` as FLWR_HOME."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get("FLWR_HOME") == str(home):
                found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def creds(tmp_path):
    from simulations.secure import make_credentials

    return make_credentials(tmp_path, 2)


def test_credentials(creds):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_ssh_private_key,
        load_ssh_public_key,
    )

    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(creds.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    assert not list(creds.server_key.parent.glob("ca.key*"))  # CA key never written
    pubs = set()
    for i, path in enumerate(creds.node_keys):
        priv = load_ssh_private_key(path.read_bytes(), None)
        assert isinstance(priv.curve, ec.SECP384R1)
        pub = load_ssh_public_key(creds.public_key(i).read_bytes())
        assert pub.public_numbers() == priv.public_key().public_numbers()
        assert creds.public_key(i).read_text().startswith("ecdsa-sha2-nistp384 ")
        pubs.add(creds.public_key(i).read_text())
    assert len(pubs) == 2  # fresh keys, not constants
    for secret in (creds.server_key, *creds.node_keys):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_client_data_files_are_the_simulation_partitions(tmp_path):
    from clients.task import full_dataset
    from fed_unlearn.config import RunConfig
    from fed_unlearn.data import load_jsonl
    from simulations.secure import write_client_data

    flat = {"preset": "tiny", "num-clients": 2, "depart": "1", "seed": 11}
    paths = write_client_data(flat, tmp_path)
    data = full_dataset(RunConfig.from_flat(flat))
    assert [p.name for p in paths] == ["client_0.jsonl", "client_1.jsonl"]
    for i, path in enumerate(paths):
        assert load_jsonl(path) == data.clients[i]


def test_proxy_route_filter():
    from simulations.fleet_proxy import is_allowed

    assert is_allowed("POST", "/v1/fleet/pull-messages")
    assert is_allowed("post", "/v1/fleet/activate-node")
    for method, path in [
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/get-nodes"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/health"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet//x"),
        ("POST", "/v1/fleetx/start-run"),
    ]:
        assert not is_allowed(method, path), (method, path)


def _wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
def test_unregistered_supernode_key_is_refused(tmp_path, creds):
    from simulations.secure import (
        UNREGISTERED_MARKER,
        SecureFederation,
        node_key_pair,
    )

    with SecureFederation(tmp_path / "fed", creds, proxy=False) as fed:
        fed.start_superlink()
        registered = fed.register(0)  # a registered key exists; ours is another
        stranger = tmp_path / "stranger"
        node_key_pair(stranger)
        proc = fed.start_supernode(1, "partition-id=1", key=stranger)
        rc = _wait_exit(proc, 90)
        log = fed.procs.log_path("supernode1").read_text(errors="replace")
        # flwr prints its exit code 305; the process itself exits with status 1
        assert rc not in (None, 0), log[-2000:]
        assert "Exit Code: 305" in log, log[-2000:]
        assert "[code: 2004] Failed to activate SuperNode" in log, log[-2000:]
        assert UNREGISTERED_MARKER in log
        link = fed.procs.log_path("superlink").read_text(errors="replace")
        assert "[/v1/fleet/activate-node][ApiError:2004]" in link, link[-2000:]
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link
        nodes = fed.list_nodes()
        # only the registered key is known, and it never came online
        assert [int(n["node-id"]) for n in nodes] == [registered]
        assert all(n["status"] != "online" for n in nodes)
    assert not _leftovers(fed.home)


@pytest.mark.slow
def test_plaintext_supernode_never_connects(tmp_path, creds):
    from simulations.secure import SecureFederation

    with SecureFederation(tmp_path / "fed", creds, proxy=False) as fed:
        fed.start_superlink()
        fed.register(0)
        proc = fed.start_supernode(0, "partition-id=0", insecure=True)
        deadline = time.time() + 25
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        log = fed.procs.log_path("supernode0").read_text(errors="replace")
        # still retrying: an HTTP request to an HTTPS port gets no Fleet answer
        assert proc.poll() is None, log[-2000:]
        assert log.count("Connection attempt failed") >= 2, log[-2000:]
        assert "Starting insecure channel" in log
        link = fed.procs.log_path("superlink").read_text(errors="replace")
        assert "/v1/fleet/" not in link, link[-2000:]  # no Fleet call ever reached it
        nodes = fed.list_nodes()
        assert all(n["status"] != "online" for n in nodes), nodes
    assert not _leftovers(fed.home)


OUTSIDER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "outsider"
version = "0.1.0"
description = "code that a party with no credential ships to every SuperNode"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "outsider.apps:server"
clientapp = "outsider.apps:client"

[tool.flwr.app.config]
marker-dir = "MARKER_DIR"
"""

OUTSIDER_APP = """
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def q(msg: Message, context: Context) -> Message:
    out = Path(context.run_config["marker-dir"])
    out.mkdir(parents=True, exist_ok=True)
    info = {"node_config": dict(context.node_config)}
    (out / f"node-{context.node_id}.json").write_text(json.dumps(info))
    return Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    msgs = [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n,
                message_type="query")
        for n in grid.get_node_ids()
    ]
    list(grid.send_and_receive(msgs, timeout=120))
"""


def _outsider_app(tmp_path):
    app = tmp_path / "outsider_app"
    (app / "outsider").mkdir(parents=True)
    marker = tmp_path / "marker"
    (app / "pyproject.toml").write_text(
        OUTSIDER_PYPROJECT.replace("MARKER_DIR", str(marker))
    )
    (app / "outsider" / "__init__.py").write_text("")
    (app / "outsider" / "apps.py").write_text(OUTSIDER_APP)
    return app, marker


@pytest.mark.slow
def test_proxy_refuses_control_routes_but_supernodes_work(tmp_path, creds):
    """Through the proxy: no Control API; on the SuperLink's own port (loopback
    only in the mitigation) anyone holding just the CA certificate starts a run whose
    ClientApp executes on the members' SuperNodes."""
    from simulations.deployment import flwr_env, write_cli_config
    from simulations.secure import SecureFederation, flwr_cli, probe_control_api

    with SecureFederation(tmp_path / "fed", creds, proxy=True) as fed:
        fed.start_superlink()
        fed.register(0)
        fed.start_proxy()
        fed.start_supernode(0, "partition-id=0")
        nodes = fed.wait_online(1, timeout=120)  # through the proxy
        assert len(nodes) == 1
        via = probe_control_api(fed.fleet_address, creds.ca_cert, tmp_path / "pp")
        for key in (
            "GET /docs",
            "GET /openapi.json",
            "POST /v1/control/list-runs",
            "POST /v1/control/list-nodes",
            "POST /v1/control/start-run (empty)",
            "POST /v1/runtime/get-nodes",
        ):
            assert via[key] == 403, (key, via)
        assert not via["flwr ls"]["ok"]
        assert "not exposed" in via["flwr ls"]["error"]
        assert not via["flwr supernode register (outsider key)"]["ok"]
        # the SuperLink's own port (loopback only) is the open Control API
        direct = probe_control_api(fed.address, creds.ca_cert, tmp_path / "pd")
        assert direct["GET /docs"] == 200
        assert direct["POST /v1/control/list-runs"] == 200
        assert direct["flwr ls"]["ok"]
        reg = direct["flwr supernode register (outsider key)"]
        assert reg["ok"] and reg["unregistered_again"]
        # the SuperNode is still online after all that
        assert [n["status"] for n in fed.list_nodes() if n["status"] == "online"] == [
            "online"
        ]
        proxy_log = fed.procs.log_path("fleet_proxy").read_text()
        assert "refused POST /v1/control/list-runs" in proxy_log
        # an outsider's `flwr run` (its own code, only the CA certificate)
        app, marker = _outsider_app(tmp_path)
        for name, addr in (("proxy", fed.fleet_address), ("direct", fed.address)):
            home = tmp_path / f"outsider_{name}"
            write_cli_config(home, "t", addr, creds.ca_cert)
            run = flwr_cli(["run", str(app), "t", "--stream"], flwr_env(home), 300)
            text = run.stdout + run.stderr
            if name == "proxy":
                assert run.returncode != 0, text[-2000:]
                assert "POST /v1/control/start-run is not exposed" in text, text
                assert not marker.exists()
            else:
                assert run.returncode == 0, text[-2000:]
        ran = [json.loads(p.read_text()) for p in marker.glob("node-*.json")]
        assert [r["node_config"]["partition-id"] for r in ran] == [0]
    assert not _leftovers(fed.home)


@pytest.mark.slow
def test_demo_stops_everything_when_a_step_fails(tmp_path, monkeypatch):
    """All processes started (SuperLink, proxy, 2 SuperNodes), then a step fails."""
    from simulations.deployment import DeploymentError, Processes
    from simulations.secure import run_demo

    seen: set[int] = set()
    pids = Processes.pids

    def spy(self):
        got = pids(self)
        seen.update(got)
        return got

    monkeypatch.setattr(Processes, "pids", spy)
    out = tmp_path / "demo"
    with pytest.raises(DeploymentError, match="run:train"):
        run_demo(out, clients=2, methods=["foul_server"], fail_at="run:train")
    summary = json.loads((out / "demo.json").read_text())
    assert not summary["ok"]
    assert [s["step"] for s in summary["steps"]][-2:] == ["supernodes", "stop"]
    assert len(seen) >= 4  # superlink, proxy, 2 supernodes (+ their superexecs)
    import psutil

    alive = [
        p
        for p in seen
        if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
    ]
    assert not alive
    assert not _leftovers(out / "flwr_home")


@pytest.mark.slow
def test_demo_stops_everything_on_sigint(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "deploy", "demo", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 180
        log = out / "demo.log"
        while time.time() < deadline:
            if log.exists() and "step run:train ..." in log.read_text():
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("the demo never reached the first flwr run")
        assert _leftovers(out / "flwr_home")  # the federation is running
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    summary = json.loads((out / "demo.json").read_text())
    assert not summary["ok"] and "KeyboardInterrupt" in summary["interrupted"]
    assert summary["steps"][-1]["step"] == "stop"
    time.sleep(1)
    assert not _leftovers(out / "flwr_home")


@pytest.mark.slow
def test_secure_demo_matches_the_simulation(tmp_path):
    """2 authenticated SuperNodes over TLS (via the proxy), 1 round. FL is one
    `flwr run` (mode=train) and the member's forget request a later one
    (mode=forget) reading the kept history; its adapters equal the Simulation
    Engine's single `fed-unlearn run` on the same config and seed, bit for bit,
    and its signed receipt verifies against them."""
    from helpers import assert_parity, run_cli

    from simulations.secure import run_demo

    out = tmp_path / "demo"
    summary = run_demo(
        out, clients=2, methods=["foul_server"], rounds=1, seed=11, local_epochs=1
    )
    assert summary["ok"]
    run = Path(summary["runs"]["foul_server"]["out_dir"])
    step = next(s for s in summary["steps"] if s["step"] == "run:foul_server")
    assert step["receipt"][0] == "signature valid (trusted key)"
    assert len(step["receipt"]) == 4  # + both adapters and the history
    forgotten = json.loads(
        (out / "federation-foul_server/history/meta.json").read_text()
    )
    assert [e["clients"] for e in forgotten["unlearnings"]] == [[1]]
    pipeline = json.loads((run / "pipeline.json").read_text())
    assert pipeline["train"]["cached"]  # the forget run trained nothing
    assert pipeline["train"]["round_log"][0]["participants"] == [0, 1]
    probe = next(s for s in summary["steps"] if s["step"] == "control_probe")
    assert probe["via_proxy"]["POST /v1/control/list-runs"] == 403
    sim = tmp_path / "sim"
    args = ["run", "--preset", "tiny", "--clients", "2", "--depart", "1"]
    args += ["--rounds", "1", "--local-epochs", "1", "--seed", "11"]
    args += ["--method", "foul_server", "--quiet", "--no-eval", "--out", str(sim)]
    run_cli(args, tmp_path / "sim-runs")
    assert_parity(run, sim)
    assert not _leftovers(out / "flwr_home")
