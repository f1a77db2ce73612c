"""Helpers shared by several test modules (no test module imports another).

pytest's default ``prepend`` import mode puts this directory on ``sys.path``
when it loads ``tests/conftest.py`` (no ``__init__.py`` here), so test modules
import these with ``from helpers import ...``; conftest imports it too, which
fails loudly at collection if that ever stops working.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

#: The tiny CLI federation of the end-to-end tests (3 clients, 2 rounds, client 2
#: departs).
E2E_BASE = ["--preset", "tiny", "--clients", "3", "--rounds", "2", "--depart", "2"]


def run_cli(args, runs_dir, check=True):
    """Run ``python -m simulations.cli ARGS`` with ``FED_UNLEARN_RUNS=runs_dir``."""
    env = {**os.environ, "FED_UNLEARN_RUNS": str(runs_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def adapter_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random two-tensor LoRA-like state (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(2, 4, generator=g),
        "m.lora_B.weight": torch.randn(3, 2, generator=g),
    }


class LinearClients:
    """In-process stand-in for the Flower channel with linear client maps.

    Client ``c`` pulls every tensor it receives towards its own target ``t_c``
    (``nll``: delta = 0.5 (t_c - x)) or pushes it away (any unlearning loss:
    delta = -0.5 (t_c - x)), for every tensor of every copy of a
    ``local-update`` request (a tensor named in the request's ``ranks`` travels
    as those ranks of it, and so does its target). Enough to exercise a
    method's contract without Flower. An ``attribution`` request gets two
    layers of four neuron scores, client ``c``'s largest at neuron ``c``.

    A ``token-accuracy`` request gets 1 / (1 + ‖x - t_c‖) (the whole adapter),
    a ``layer-grams`` request ``A_cᵀ A_c`` per ``lora_A`` tensor of ``t_c``
    (its rows as the client's inputs).
    """

    def __init__(self, targets):
        self.targets = targets
        self.calls = []  #: (recipients, wire fields of the first request)
        self.requests = []  #: each query's typed requests

    def query(self, requests):
        from fed_unlearn.adapters import take_ranks
        from fed_unlearn.protocol import (
            AttributionReply,
            AttributionRequest,
            LayerGramReply,
            LayerGramRequest,
            LocalUpdateReply,
            LocalUpdateRequest,
            TokenAccuracyReply,
            TokenAccuracyRequest,
        )

        out = {}
        for cid, req in requests.items():
            if isinstance(req, AttributionRequest):
                # two layers of four neurons; client c favours neuron c
                scores = [torch.arange(4.0) - 3 * (torch.arange(4) != cid)] * 2
                out[cid] = AttributionReply(
                    scores,
                    client_id=cid,
                    num_examples=10,
                    passes=1,
                    attribution_seconds=0.0,
                )
                continue
            if isinstance(req, TokenAccuracyRequest):
                t = self.targets[cid]
                gap = sum(float((req.adapter[k] - t[k]).pow(2).sum()) for k in t)
                out[cid] = TokenAccuracyReply(
                    token_accuracy=1.0 / (1.0 + gap**0.5), num_examples=10
                )
                continue
            if isinstance(req, LayerGramRequest):
                grams = {
                    k: v.T @ v for k, v in self.targets[cid].items() if ".lora_A." in k
                }
                out[cid] = LayerGramReply(grams, num_examples=10, tokens=20)
                continue
            assert isinstance(req, LocalUpdateRequest)
            sign = 1.0 if req.loss == "nll" else -1.0
            deltas = []
            for copy in req.copies:
                got = {}
                for name, x in copy.items():
                    target = self.targets[cid][name]
                    if name in req.ranks:  # the copy is a slice of these ranks
                        target = take_ranks(target, name, req.ranks[name])
                    got[name] = sign * 0.5 * (target - x)
                deltas.append(got)
            out[cid] = LocalUpdateReply(
                deltas,
                client_id=cid,
                num_examples=10,
                local_steps=1,
                tokens=5,
                train_seconds=0.0,
                loss=0.0,
            )
        # (recipients, the wire fields of the first request)
        self.calls.append(
            (tuple(requests), next(iter(requests.values())).to_fields()[0])
        )
        self.requests.append(requests)
        return out


class LeavingClients(LinearClients):
    """Linear clients whose ``leaver`` answers ``answers`` queries, then fails."""

    def __init__(self, targets, leaver, answers):
        super().__init__(targets)
        self.leaver, self.left = leaver, answers

    def query(self, requests):
        from fed_unlearn.methods.base import ClientFailure

        if self.leaver in requests:
            if self.left == 0:
                others = {c: r for c, r in requests.items() if c != self.leaver}
                replies = super().query(others) if others else {}
                raise ClientFailure(
                    f"client {self.leaver} failed",
                    replies=replies,
                    failed={self.leaver: "failed the 'local-update' request: gone"},
                )
            self.left -= 1
        return super().query(requests)


def full_context(trained, tmp_path=None):
    """A context with a two-round history, a retrain oracle and linear clients."""
    import tempfile

    from fed_unlearn.history import HistoryStore, RoundRecord
    from fed_unlearn.methods import UnlearnContext

    retrained = {k: v * 0.5 for k, v in trained.items()}
    calls = []

    def retrain():
        calls.append(1)
        return retrained

    root = tmp_path or tempfile.mkdtemp()
    store = HistoryStore(f"{root}/history")
    targets = {c: adapter_state(10 + c) for c in (0, 1)}
    deltas = {
        c: {k: 0.1 * (targets[c][k] - trained[k]) for k in trained} for c in (0, 1)
    }
    # a FedAvg history (equal weights) that ends at ``trained``
    step = {k: (deltas[0][k] + deltas[1][k]) / 2 for k in trained}
    for r in (1, 2):
        store.append(
            RoundRecord(
                round=r,
                global_state={k: trained[k] - (3 - r) * step[k] for k in trained},
                client_deltas=deltas,
                num_examples={0: 10, 1: 10},
                participants=[0, 1],
            )
        )
    store.set_final(trained)
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        retrain=retrain,
        clients=LinearClients(targets),
        departed_cooperates=True,
    )
    return ctx, retrained, calls


def one_round_history(tmp_path, trained, deltas, sizes=None):
    """A history store of one FL round: ``deltas`` client -> adapter delta."""
    from fed_unlearn.history import HistoryStore, RoundRecord

    store = HistoryStore(tmp_path / "h")
    store.append(
        RoundRecord(
            round=1,
            global_state=trained,
            client_deltas=deltas,
            num_examples=sizes or dict.fromkeys(deltas, 10),
            participants=sorted(deltas),
        )
    )
    store.set_final(trained)
    return store


def saved_adapters(out):
    """The original, unlearned and retrain adapters a run saved (peft files)."""
    from safetensors.torch import load_file

    return {
        name: load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        for name in ("original", "unlearned", "retrain")
    }


def assert_parity(out, sim):
    """Deployment and simulation give the same adapters: bit-identical.

    Both engines run the same ClientApp code on the same CPU with the same seeds
    (LoRA init, data order, per-round derive_seed) and aggregate in the same order
    (by client id), so no tolerance is needed."""
    dep, simu = saved_adapters(out), saved_adapters(sim)
    for name in dep:
        assert dep[name].keys() == simu[name].keys()
        for k in dep[name]:
            assert torch.equal(dep[name][k], simu[name][k]), (name, k)


def train_reply(to, cid, adapter, n=10, proto=None):
    """A client's Flower reply to the train message ``to``: ``adapter``, ``n``
    examples and the metrics a train reply must carry (plus a ``dual-prototype``,
    which no reply may carry)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    metrics = {
        "num-examples": n,
        "client-id": cid,
        "train-loss": 1.0,
        "local-steps": 1,
        "tokens": 8,
        "train-seconds": 0.1,
    }
    if proto is not None:
        metrics["dual-prototype"] = proto
    content = RecordDict(
        {"arrays": ArrayRecord(adapter), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=to)
