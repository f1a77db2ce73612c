"""FOUL, FedOSD, MPU and local_unlearn end to end: CLI on the Simulation Engine.

One ``none`` run caches both FL phases (tiny preset, 2 rounds); each method then
runs from the CLI with live Flower clients and writes its metrics.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import E2E_BASE, run_cli

#: every test here runs Flower federations in several processes
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Cache both FL phases once; every CLI run of this module records each
    Flower message it sends or receives into one wire-audit file (checked by
    the last test of the module)."""
    import os

    from server.grid import AUDIT_ENV

    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("out") / "none"
    os.environ[AUDIT_ENV] = str(runs / "wire-audit.jsonl")
    run_cli(
        [
            "run",
            *E2E_BASE,
            "--method",
            "none",
            "--quiet",
            "--no-eval",
            "--out",
            str(out),
        ],
        runs,
    )
    yield runs, json.loads((out / "run.json").read_text())
    os.environ.pop(AUDIT_ENV, None)


def _run(cached, tmp_path, method, *opts, evaluate=True):
    runs, _ = cached
    out = tmp_path / method
    args = ["run", *E2E_BASE, "--method", method, "--quiet", "--out", str(out)]
    for opt in opts:
        args += ["--opt", opt]
    if not evaluate:
        args.append("--no-eval")
    run_cli(args, runs)
    return out, json.loads((out / "run.json").read_text())


def _adapter_bytes(out):
    from safetensors.torch import load_file

    state = load_file(str(out / "adapters" / "original" / "adapter_model.safetensors"))
    return sum(v.numel() * 4 for v in state.values()), state


def _common(run, rounds):
    assert run["rounds"]["unlearn"] == rounds
    assert [p["round"] for p in run["curves"]["unlearn"]] == list(range(rounds + 1))
    assert run["client_compute"]["unlearn"]["local_steps"] > 0
    assert run["bytes"]["unlearn"]["down"] > 0 and run["bytes"]["unlearn"]["up"] > 0
    assert run["cached"] == {"train": True, "retrain": True}


def test_foul_cached_sends_only_the_subnetwork(cached, tmp_path):
    out, run = _run(
        cached, tmp_path, "foul", "rounds=2", "stop=budget", "subnetwork=ratio"
    )
    _common(run, 2)
    info = run["unlearn_info"]
    sub = info["subnetwork"]
    assert 0 < sub["tensors"] < sub["of_tensors"]
    full, _ = _adapter_bytes(out)
    assert sub["adapter_bytes"] == full
    # round 1: θ_V + frozen base down to 2 clients; round 2: θ_V only; θ_V up twice
    down, up = run["bytes"]["unlearn"]["down"], run["bytes"]["unlearn"]["up"]
    v = sub["bytes"]
    assert 2 * (full + v) <= down <= 2 * (full + v) + 200_000
    assert 4 * v <= up <= 4 * v + 50_000
    for r in info["rounds"]:
        assert len(r["gamma"]) == 3 and abs(sum(r["gamma"]) - 1) < 1e-4
    assert (out / "TOFU_SUMMARY.json").is_file()
    unl = json.loads((out / "evals" / "unlearned" / "TOFU_SUMMARY.json").read_text())
    assert "forget_Q_A_Prob" in unl


def test_foul_cached_rank_mode_sends_only_the_selected_ranks(cached, tmp_path):
    """granularity=rank through Flower: θ_V is rows of A / columns of B, and only
    those travel (θ_V's bytes are exactly its entries); round 1 also sends the
    whole adapter as the clients' base, into which they write the ranks."""
    out, run = _run(
        cached,
        tmp_path,
        "foul",
        "rounds=2",
        "stop=budget",
        "granularity=rank",
        evaluate=False,
    )
    _common(run, 2)
    sub = run["unlearn_info"]["subnetwork"]
    full, _ = _adapter_bytes(out)
    v = sub["bytes"]
    assert v == 4 * sub["params"] and 0 < v < full / 2
    down, up = run["bytes"]["unlearn"]["down"], run["bytes"]["unlearn"]["up"]
    assert 2 * (full + 2 * v) <= down <= 2 * (full + 2 * v) + 200_000
    assert 4 * v <= up <= 4 * v + 50_000


def test_fedosd_runs_unlearning_and_post_training(cached, tmp_path):
    out, run = _run(
        cached,
        tmp_path,
        "fedosd",
        "unlearn_rounds=1",
        "post_rounds=1",
        "stop=budget",
        evaluate=False,
    )
    _common(run, 2)
    stages = [r["stage"] for r in run["unlearn_info"]["rounds"]]
    assert stages == ["unlearn", "post"]
    # FedOSD's direction is orthogonal to the remaining clients' pseudo-gradients
    assert run["unlearn_info"]["rounds"][0]["max_rel_retain_inner"] < 1e-3


def test_mpu_sends_m_copies_and_moves_the_adapter(cached, tmp_path):
    out, run = _run(
        cached,
        tmp_path,
        "mpu",
        "rounds=1",
        "copies=3",
        "stop=budget",
        "inner_loss=ga",
        "retain=none",
    )
    _common(run, 1)
    full, original = _adapter_bytes(out)
    down = run["bytes"]["unlearn"]["down"]
    # three copies to the departed client, and the interleaved recovery round's
    # adapter to each of the two remaining clients
    assert 5 * full <= down <= 5 * full + 80_000
    from safetensors.torch import load_file

    unl = load_file(str(out / "adapters" / "unlearned" / "adapter_model.safetensors"))
    assert any(not torch.equal(unl[k], original[k]) for k in original)
    curve = run["curves"]["unlearn"]
    assert curve[1]["forget_Q_A_Prob"] < curve[0]["forget_Q_A_Prob"]
    assert "alphas" not in json.dumps(run["unlearn_info"])  # secrets stay secret


def test_local_unlearn_baseline_runs(cached, tmp_path):
    _, run = _run(
        cached,
        tmp_path,
        "local_unlearn",
        "rounds=1",
        "stop=budget",
        "inner_loss=npo",
        evaluate=False,
    )
    _common(run, 1)


def test_bad_method_option_is_a_clear_error(cached, tmp_path):
    runs, _ = cached
    for opt, msg in (
        ("kappa=-1", "kappa must be >= 0"),
        ("bogus=1", "has no option 'bogus'"),
        ("mode=sideways", "mode must be one of"),
    ):
        out = tmp_path / f"bad{opt.split('=')[0]}"
        proc = run_cli(
            ["run", *E2E_BASE, "--method", "foul", "--opt", opt, "--out", str(out)],
            runs,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr
        assert not out.exists()
    proc = run_cli(
        [
            "run",
            *E2E_BASE,
            "--method",
            "mpu",
            "--opt",
            "copies=1",
            "--out",
            str(tmp_path / "m"),
        ],
        runs,
        check=False,
    )
    assert proc.returncode == 2 and "copies (m) must be >= 2" in proc.stderr
    proc = run_cli(
        [
            "run",
            *E2E_BASE,
            "--method",
            "mpu",
            "--opt",
            "inner_loss=xx",
            "--out",
            str(tmp_path / "x"),
        ],
        runs,
        check=False,
    )
    assert proc.returncode == 2 and "unknown inner loss 'xx'" in proc.stderr


def test_mpu_never_sends_the_clean_adapter(cached, monkeypatch):
    """Inspect every message MPU sends: none to the departed client carries the
    clean adapter (the interleaved recovery rounds send it to the remaining
    clients only)."""
    import server.pipeline as pipeline
    from fed_unlearn.config import RunConfig
    from fed_unlearn.protocol import unpack_copies
    from simulations.runner import simulate

    runs, _ = cached
    monkeypatch.setenv("FED_UNLEARN_RUNS", str(runs))
    sent = []

    class Recording(pipeline.CountingGrid):
        def _count_out(self, messages):
            msgs = super()._count_out(messages)
            for m in msgs:
                cfg = m.content.config_records["config"]
                if cfg.get("kind") == "local-update":
                    arrays = m.content["arrays"].to_torch_state_dict()
                    sent.append((m.metadata.dst_node_id, arrays))
            return msgs

    monkeypatch.setattr(pipeline, "CountingGrid", Recording)
    cfg = RunConfig.from_flat(
        {
            "preset": "tiny",
            "num-clients": 3,
            "num-server-rounds": 2,
            "depart": "2",
            "method": "mpu",
            "method-rounds": 2,
            "method-stop": "budget",
            "method-inner_loss": "ga",
            "method-retain": "none",
        }
    )
    out = simulate(cfg, ("train", "unlearn"), progress=False)
    assert out.train.cached and out.retrain.cached
    theta = out.train.final
    is_mpu = [any(k.startswith("copy1.") for k in a) for _, a in sent]
    mpu = [x for x, y in zip(sent, is_mpu, strict=True) if y]
    recovery = [x for x, y in zip(sent, is_mpu, strict=True) if not y]
    assert len(mpu) == 2  # one message per round, m = 2 copies in each
    departed_node = {n for n, _ in mpu}
    assert len(departed_node) == 1
    # interleaved recovery: each round one message to each remaining client
    assert len(recovery) == 4 and not departed_node & {n for n, _ in recovery}
    for _, arrays in mpu:
        copies, base = unpack_copies(arrays)
        assert not base
        assert len(copies) == 2
        for copy in copies:
            assert set(copy) == set(theta)
            for k in theta:
                assert not torch.allclose(copy[k], theta[k], atol=1e-6), k
        # the plain average of the copies is not the clean adapter either
        for k in theta:
            avg = (copies[0][k] + copies[1][k]) / 2
            assert not torch.allclose(avg, theta[k], atol=1e-6), k


def test_foul_server_mode_runs_without_clients(cached, tmp_path):
    """mode=server: no Flower message, no byte, a curve, and the cost accounting
    without the per-round curve evaluation."""
    out, run = _run(cached, tmp_path, "foul", "mode=server", "rounds=3", "stop=budget")
    assert run["bytes"]["unlearn"] == {"down": 0, "up": 0, "total": 0}
    assert run["rounds"]["unlearn"] == 0
    assert run["unlearn_info"]["server_steps"] == 3
    assert run["client_compute"]["unlearn"]["local_steps"] == 0
    curve = run["curves"]["unlearn"]
    assert [p["round"] for p in curve] == [0, 1, 2, 3]
    assert curve[3]["forget_Q_A_Prob"] != curve[0]["forget_Q_A_Prob"]
    # simulated clients take their partition of the server's data set
    clients = "clients'"
    assert run["curve_data"] == dict.fromkeys(("train", "retrain", "unlearn"), clients)
    wall = run["wall_time_s"]
    assert wall["curve_eval"]["unlearn"] > 0
    assert wall["curve_eval"]["retrain"] > 0  # the fixture's phases were timed
    for phase in ("retrain", "unlearn"):
        # the curve evaluation is part of the phase, and not all of it
        assert 0 < wall["excl_curve_eval"][phase] < wall[phase]
        assert wall["curve_eval"][phase] < wall[phase]
    # a cached phase reports the times measured when it ran (the fixture's run),
    # not this run's: the cache hit took no evaluation time of its own
    _, first = cached
    for key in ("retrain", "train"):
        assert wall[key] == first["wall_time_s"][key]
        assert wall["curve_eval"][key] == first["wall_time_s"]["curve_eval"][key]


def test_foul_server_defaults_one_two_step_recovery_round_in_fp16(cached, tmp_path):
    """foul_server's defaults: the server step, then one recovery round with the
    whole adapter to each remaining client and a delta back, in fp16 (2 bytes
    per parameter each way), 2 local steps each, sized by the budget."""
    out, run = _run(
        cached, tmp_path, "foul_server", "rounds=2", "stop=budget", evaluate=False
    )
    full, _ = _adapter_bytes(out)  # fp32 bytes of the adapter
    down, up = run["bytes"]["unlearn"]["down"], run["bytes"]["unlearn"]["up"]
    assert full <= down <= full + 60_000  # 2 clients x full/2
    assert full <= up <= full + 40_000
    assert run["rounds"]["unlearn"] == 1
    assert run["unlearn_info"]["rounds"][-1]["stage"] == "recovery"
    assert run["unlearn_info"]["server_steps"] == 2
    assert run["client_compute"]["unlearn"]["local_steps"] == 4
    # the 1/6 budget of 2 rounds x 3 epochs x 30 items: 2 steps of 15 per
    # client, 60 examples in all (2 steps of the run's batch would be 16);
    # retraining saw 2 x 3 x 2 x 30 = 360, which gives the mean tokens per example
    per_example = run["client_compute"]["retrain"]["tokens"] / 360
    assert 48 * per_example < run["client_compute"]["unlearn"]["tokens"]
    assert run["client_compute"]["unlearn"]["tokens"] < 72 * per_example


def test_foul_dual_adapter_run_from_the_cli(tmp_path_factory, monkeypatch):
    """FOUL-LoRA option A end to end: FL with the dual adapter (rank 2r, the
    K/V regularisers, the server's public-probe prototype broadcast every
    round), then FOUL on the server with θ_V = V; K leaves unlearning exactly as
    FL trained it. Its own federation, under its own wire audit: no client sends
    a prototype (or any list) back."""
    from safetensors.torch import load_file

    from server.grid import AUDIT_ENV

    runs = tmp_path_factory.mktemp("dual_runs")
    monkeypatch.setenv(AUDIT_ENV, str(runs / "wire-audit.jsonl"))
    out = tmp_path_factory.mktemp("dual_out") / "foul"
    args = ["run", *E2E_BASE, "--method", "foul_server", "--quiet", "--no-eval"]
    args += ["--set", "dual-adapter=true", "--opt", "subnetwork=dual"]
    args += ["--opt", "recovery_rounds=0", "--opt", "rounds=3"]
    args += ["--opt", "stop=budget", "--out", str(out)]
    run_cli(args, runs)
    run = json.loads((out / "run.json").read_text())
    pipe = json.loads((out / "pipeline.json").read_text())
    for phase in ("train", "retrain"):
        log = pipe[phase]["round_log"]
        assert [r["round"] for r in log] == [1, 2]
        assert all(r["dual-loss-v"] > 0 for r in log)
        # the server's prototype needs no client statistic: it pulls K from
        # round 1 on, in the 2-client retrain too
        assert all(r["dual-loss-k"] > 0 for r in log)
    kinds, types = _check_wire_audit(runs)
    assert ("down", "train") in types and ("up", "train") in types
    sub = run["unlearn_info"]["subnetwork"]
    assert sub["rule"] == "dual" and 2 * sub["params"] == sub["of_params"]
    assert run["unlearn_info"]["server_steps"] == 3
    before = load_file(str(out / "adapters" / "original" / "adapter_model.safetensors"))
    after = load_file(str(out / "adapters" / "unlearned" / "adapter_model.safetensors"))
    r2 = 2 * 8  # tiny: lora-r 8, so rank 16 and V = ranks 8..15
    for k, v in before.items():
        assert v.shape[0 if "lora_A" in k else 1] == r2, k
        k_half = (slice(0, 8), slice(None)) if "lora_A" in k else (..., slice(0, 8))
        v_half = (slice(8, 16), slice(None)) if "lora_A" in k else (..., slice(8, 16))
        assert torch.equal(after[k][k_half], v[k_half]), k
        assert not torch.equal(after[k][v_half], v[v_half]), k


def test_default_run_is_oracle_free_and_an_oracle_stop_is_flagged(cached, tmp_path):
    out, run = _run(cached, tmp_path, "foul_server", "rounds=3", evaluate=False)
    assert run["oracle_stopped"] is False
    assert run["unlearn_info"]["stopped_by"] == "budget"
    assert "unlearn_method_only" not in run["wall_time_s"]
    out2, run2 = _run(
        cached, tmp_path / "o", "foul_server", "rounds=3", "stop=oracle", evaluate=False
    )
    assert run2["oracle_stopped"] is True
    walls, by = run2["wall_time_s"], run2["bytes"]
    assert walls["unlearn"] == pytest.approx(
        walls["unlearn_method_only"] + walls["retrain"]
    )
    assert by["unlearn"]["total"] == (
        by["unlearn_method_only"]["total"] + by["retrain"]["total"]
    )


def test_mpu_self_audit_stop(tmp_path, monkeypatch):
    """The departed client keeps 30 % of its items out of training; MPU stops on
    its one scalar per round, with no oracle level handed to the method."""
    from server.grid import AUDIT_ENV

    monkeypatch.delenv(AUDIT_ENV, raising=False)  # its own federation
    runs = tmp_path / "runs"
    out = tmp_path / "audit"
    args = [
        "run",
        *E2E_BASE,
        "--method",
        "mpu",
        "--quiet",
        "--no-eval",
        "--out",
        str(out),
    ]
    args += ["--set", "audit-fraction=0.3", "--opt", "stop=self_audit"]
    args += ["--opt", "rounds=3"]
    run_cli(args, runs)
    run = json.loads((out / "run.json").read_text())
    info = run["unlearn_info"]
    gaps = info["audit_gaps"]
    assert 2 <= len(gaps) <= 4  # round 0 and one per round until the stop
    assert gaps[0] > 0  # trained items are more likely than never-trained ones
    assert info["stopped_by"] in {"self_audit", "audit_overshoot", "budget"}
    if info["stopped_by"] == "self_audit":
        assert abs(gaps[-1]) <= 0.1 * abs(gaps[0])
    assert run["oracle_stopped"] is False
    assert [r["audit_gap"] for r in info["rounds"] if "audit_gap" in r] == gaps[1:]


def test_a_signed_receipt_for_a_cli_unlearning_verifies(cached, tmp_path):
    """The done-when of a receipt: `receipt verify` passes on what a run wrote,
    with the run's adapters and history, and one changed field fails."""
    from fed_unlearn.receipt import new_signing_key

    runs, _ = cached
    public = new_signing_key(tmp_path / "sign")
    out = tmp_path / "fs"
    run_cli(
        [
            "run", *E2E_BASE, "--method", "foul_server", "--quiet", "--no-eval",
            "--set", f"receipt-key-file={tmp_path / 'sign'}", "--out", str(out),
        ],
        runs,
    )  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["departed"] == [2] and receipt["method"] == "foul_server"
    assert receipt["signer"]["public_key"] == public
    assert receipt["wire_bytes"] == run["bytes"]["unlearn"]
    verify = [
        "receipt", "verify", str(out / "receipt.json"),
        "--public-key", str(tmp_path / "sign.pub"),
        "--adapter", str(out / "adapters" / "unlearned"),
        "--adapter-before", str(out / "adapters" / "original"),
        "--history", run["history"]["path"],
    ]  # fmt: skip
    ok = run_cli(verify, runs)
    assert ok.stdout.count("ok: ") == 4
    (out / "receipt.json").write_text(json.dumps({**receipt, "departed": [1]}))
    bad = run_cli(verify, runs, check=False)
    assert bad.returncode == 1 and "invalid signature" in bad.stderr


def test_forget_requests_run_in_sequence_from_a_saved_federation(cached, tmp_path):
    """`train` keeps the federation; each `forget` is a later, separate run that
    trains nothing, starts from the last unlearned adapter, refuses a client that
    never joined or is already forgotten (changing nothing), and records whom
    the federation has forgotten."""
    from safetensors.torch import load_file

    runs, _ = cached
    fed = tmp_path / "fed"
    train = ["train", *E2E_BASE, "--quiet", "--out", str(fed)]
    run_cli(train, runs)
    assert (fed / "federation" / "history" / "meta.json").is_file()

    def forget(client, out, check=True):
        args = ["forget", str(fed), "--client", str(client), "--method", "foul_server"]
        return run_cli([*args, "--quiet", "--no-eval", "--out", str(out)], runs, check)

    def snapshot():
        root = fed / "federation"
        return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    forget(2, tmp_path / "f2")
    first = json.loads((tmp_path / "f2" / "run.json").read_text())
    assert first["forgotten"] == [2] and first["forgotten_before"] == []
    assert first["remaining"] == [0, 1]
    assert first["rounds"]["train"] == 2 and first["cached"]["train"] is True
    before = snapshot()
    again = forget(2, tmp_path / "again", check=False)
    assert again.returncode == 1 and "[2] are already forgotten" in again.stderr
    never = forget(7, tmp_path / "never", check=False)
    assert never.returncode == 2 and "[7] never joined" in never.stderr
    assert snapshot() == before
    assert not (tmp_path / "again" / "run.json").exists()

    forget(1, tmp_path / "f1")
    second = json.loads((tmp_path / "f1" / "run.json").read_text())
    assert second["forgotten_before"] == [2] and second["forgotten"] == [1, 2]
    assert second["remaining"] == [0]
    unlearned = load_file(
        str(tmp_path / "f2/adapters/unlearned/adapter_model.safetensors")
    )
    start = load_file(str(tmp_path / "f1/adapters/original/adapter_model.safetensors"))
    assert unlearned.keys() == start.keys()
    assert all(torch.equal(unlearned[k], start[k]) for k in start)


#: The registered methods no other test of this module runs, with options that
#: keep each run small (every message of them goes into the wire audit).
AUDIT_ONLY = {
    "retrain": [],
    "fed_eraser": [],
    "fed_recovery": [],
    "simu": ["ig_steps=2", "rounds=1"],
    "pga": ["rounds=1", "tau=0.01"],
    "sfu": ["max_items=8"],
    "ssiuu": ["rounds=1"],
    "ortho_lora": ["rounds=1"],
}


#: The methods the other tests of this module run (``none``: the fixture).
RUN_ABOVE = {"none", "foul", "foul_server", "fedosd", "mpu", "local_unlearn"}


def test_the_audit_covers_every_registered_method():
    """A method added to the registry must be run in this audited module."""
    from fed_unlearn.methods import METHOD_REGISTRY

    assert set(METHOD_REGISTRY) == RUN_ABOVE | set(AUDIT_ONLY)


@pytest.mark.parametrize("method", sorted(AUDIT_ONLY))
def test_every_other_registered_method_runs_in_the_audited_federation(
    cached, tmp_path, method
):
    extra = ["--depart", "2,0", "--sequential"] if method == "ortho_lora" else []
    runs, _ = cached
    out = tmp_path / method
    args = ["run", *E2E_BASE, *extra, "--method", method, "--quiet", "--no-eval"]
    for opt in AUDIT_ONLY[method]:
        args += ["--opt", opt]
    run_cli([*args, "--out", str(out)], runs)
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method


def test_wire_audit_only_adapter_tensors_aggregate_metrics_and_configs(cached):
    """Every message of every method run in this module (FL, retrain, each
    method's queries, recovery rounds), checked against the product's promise
    (:func:`_check_wire_audit`)."""
    runs, _ = cached
    kinds, types = _check_wire_audit(runs)
    assert {
        "hello",
        "local-update",
        "attribution",
        "token-accuracy",
        "layer-grams",
    } <= kinds
    assert ("down", "train") in types


#: Run config keys only the server has any use for (written out here, apart from
#: the protocol's own list): none may reach a client.
SERVER_ONLY_KEYS = frozenset(
    {
        "depart",
        "sequential",
        "departed-online",
        "out-dir",
        "federation-dir",
        "history-key-file",
        "receipt-key-file",
        "history-dtype",
        "mode",
        "strategy",
        "aggregation",
        "fraction-train",
        "eval-max-items",
        "eval-curve-items",
        "eval-relearn-steps",
    }
)


def _check_wire_audit(runs):
    """Check a wire-audit file independently of the protocol code: arrays are
    floating tensors of the adapter's shapes (or rank slices of them) under
    adapter keys; metrics are scalars (no list-valued metric from a client);
    configs are the run config without the method, and a request's own fields;
    no bytes anywhere. Returns the request kinds and (direction, type) seen."""
    import dataclasses
    import re

    from fed_unlearn.config import RunConfig

    lines = [
        json.loads(x) for x in (runs / "wire-audit.jsonl").read_text().splitlines()
    ]
    schema = json.loads(next(runs.glob("fl-*/history/meta.json")).read_text())["schema"]
    run_keys = {
        f.name.replace("_", "-")
        for f in dataclasses.fields(RunConfig)
        if f.name not in ("method_options", "extra")
    }
    copy_key = re.compile(r"^(?:copy\d+\.|base\.)?(?P<key>.+)$")
    kinds, types = set(), set()
    assert len(lines) > 10
    for m in lines:
        types.add((m["direction"], m["type"].split(".")[-1].lower()))
        assert not m["error"], m
        for name, rec in m["records"].items():
            entries = rec["entries"]
            for k, v in entries.items():
                assert v[0] != "bytes", (name, k)
            if rec["kind"] == "arrays":
                for k, (dtype, shape) in entries.items():
                    assert dtype in ("float32", "float16"), (k, dtype)
                    if k.startswith("scores."):
                        # SIMU: one per-layer neuron-score vector, summed over
                        # the client's items, client to server
                        assert m["direction"] == "up" and len(shape) == 1, (k, m)
                        continue
                    if k.startswith("basis."):
                        # ortho_lora: a server-made basis of a lora_B's output
                        # space (a function of earlier adapters), server to client
                        full = schema[k[len("basis.") :]]
                        assert m["direction"] == "down", (k, m)
                        assert shape[0] == full[0] and shape[1] <= full[0], (k, shape)
                        continue
                    key = copy_key.match(k)["key"]
                    assert key in schema, k
                    full = schema[key]
                    if "lora_A" in key and shape == [full[1], full[1]]:
                        # SFU: a layer's Gram matrix summed over the client's
                        # tokens, client to server
                        assert m["direction"] == "up", (k, m)
                        continue
                    assert len(shape) == 2 and (
                        shape == full
                        or (shape[1] == full[1] and shape[0] <= full[0])
                        or (shape[0] == full[0] and shape[1] <= full[1])
                    ), (k, shape, full)
            elif rec["kind"] == "metrics":
                for k, (typ, *_rest) in entries.items():
                    assert typ in ("int", "float"), (k, typ)
            elif name == "run":
                assert set(entries) <= run_keys, set(entries) - run_keys
                assert not any(k.startswith("method") for k in entries)
                # need to know: no departure plan, no server path, nothing of
                # the server's strategy or evaluation
                leaked = set(entries) & SERVER_ONLY_KEYS
                assert not leaked, (leaked, m["direction"], m["type"])
            else:
                assert name == "config", name
                kinds.add(entries.get("kind", ["str", "(train)"])[1])
                for k, (typ, value, *_r) in entries.items():
                    if typ == "str":  # a request's names, never data
                        assert k in (
                            "kind",
                            "loss",
                            "retain",
                            "optimizer",
                            "attribution-variant",
                        ), (k, value)
                    if typ == "list":  # rank/neuron selections, the prototype
                        assert k == "dual-prototype" or k.startswith(
                            ("ranks.", "neurons.")
                        ), k
                        assert m["direction"] == "down", m
    return kinds, types
