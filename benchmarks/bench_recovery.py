"""Benchmark: a recovery round's recipe against the data order of its batches.

    fed-unlearn run --preset tiny --method foul --opt mode=server \\
        --opt subnetwork=all --out runs/server-step
    python benchmarks/bench_recovery.py runs/server-step \\
        --recipe budget=1/12,steps=2 --recipe batch=4,steps=2 --orders 10

Starts from the run's unlearned adapter (for FOUL's server step alone, the point
where ``foul_server``'s recovery round begins) and replays one recovery round of
the remaining clients for each recipe and each of ``--orders`` data orders
(seed rounds 40001, 41001, ...; 40001 is the one a CLI run uses). No Flower
here: each client runs the ClientApp's own training code
(:func:`fed_unlearn.training.local_train`, batches sized by
:func:`fed_unlearn.training.budget_batches` for a budget) from the fp16 adapter
and returns an fp16 delta, as on the wire; the server applies their
``num-examples``-weighted mean. Only the transport differs from a real run.

A recipe is ``key=value`` pairs: ``steps`` (local steps, 0 = one epoch),
``batch`` (examples per step; default: the run's), ``budget`` (share of the
examples retraining would show the client, e.g. ``1/12``, instead of ``batch``), ``lr_scale``
(x the run's learning rate). For each it prints model_utility / the retrain
oracle's per order, their mean and range, the share of the forget-probability
gap closed (original to oracle) and the clients' training seconds; ``--parts``
adds the six numbers behind model_utility for the oracle, the start and each
order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from fed_unlearn import seeds

RECIPE_KEYS = {
    "steps": int,
    "batch": int,
    "budget": lambda v: float(Fraction(v)),
    "lr_scale": float,
}


def _parts(summary: dict[str, Any]) -> str:
    from fed_unlearn.metrics import MODEL_UTILITY_PARTS

    return " ".join(f"{p}={summary[p]:.3f}" for p in MODEL_UTILITY_PARTS)


def parse_recipe(text: str) -> dict[str, Any]:
    """Parse ``key=value,...`` into a recipe (keys of :data:`RECIPE_KEYS`)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in RECIPE_KEYS:
            raise SystemExit(f"bad recipe item {part!r}; keys: {sorted(RECIPE_KEYS)}")
        out[key] = RECIPE_KEYS[key](value)
    if "budget" in out and ("batch" in out or not out.get("steps")):
        raise SystemExit(f"{text!r}: a budget needs steps >= 1 and no batch")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--recipe", action="append", required=True)
    ap.add_argument("--orders", type=int, default=10)
    ap.add_argument(
        "--parts", action="store_true", help="print model_utility's parts per order"
    )
    args = ap.parse_args()
    recipes = [parse_recipe(t) for t in args.recipe]

    from safetensors.torch import load_file

    from clients.task import client_items
    from fed_unlearn import adapters as ad
    from fed_unlearn.aggregation import fedavg
    from fed_unlearn.config import RunConfig
    from fed_unlearn.metrics import MODEL_UTILITY_PARTS, evaluate
    from fed_unlearn.models import (
        get_adapter,
        load_lora_model,
        prompt_formatter,
        resolve_model_dir,
        set_adapter,
    )
    from fed_unlearn.training import TrainSpec, budget_batches, derive_seed, local_train
    from simulations.runner import eval_options, eval_splits

    run = json.loads((args.run_dir / "run.json").read_text())
    cfg = RunConfig.from_flat(run["config"]).resolved()
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    pf = prompt_formatter(tok)
    splits, departed = eval_splits(cfg), cfg.departed()
    metrics = ["model_utility", "forget_Q_A_Prob", *MODEL_UTILITY_PARTS]

    def adapter(name: str) -> dict[str, torch.Tensor]:
        path = args.run_dir / "adapters" / name / "adapter_model.safetensors"
        return {k: v.float() for k, v in load_file(str(path)).items()}

    def score(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        set_adapter(model, state)
        _, summary = evaluate(
            model, tok, pf, splits, metrics=metrics, **eval_options(cfg)
        )
        return summary

    oracle, original = score(adapter("retrain")), score(adapter("original"))
    start = adapter("unlearned")
    s0 = score(start)
    if args.parts:
        print(f"oracle: {_parts(oracle)}\nstart: {_parts(s0)}")
    gap = original["forget_Q_A_Prob"] - oracle["forget_Q_A_Prob"]
    print(
        f"oracle model_utility {oracle['model_utility']:.3f}; start "
        f"{s0['model_utility'] / oracle['model_utility']:.3f}x, gap closed "
        f"{(original['forget_Q_A_Prob'] - s0['forget_Q_A_Prob']) / gap:.2f}"
    )
    wire = {k: v.half().float() for k, v in start.items()}
    remaining = [c for c in range(cfg.num_clients) if c not in departed]
    items = {c: client_items(cfg, {"partition-id": c}) for c in remaining}
    for recipe in recipes:
        steps = int(recipe.get("steps", 0))
        utils, closed, seconds = [], [], []
        for o in range(args.orders):
            deltas, weights, t0 = [], [], time.perf_counter()
            for c in remaining:
                n = len(items[c])
                batch, epochs = int(recipe.get("batch", cfg.batch_size)), 1
                if "budget" in recipe:
                    batch, epochs = budget_batches(
                        recipe["budget"],
                        int(cfg.num_server_rounds),
                        int(cfg.local_epochs),
                        n,
                        steps,
                    )
                spec = TrainSpec(
                    epochs=epochs,
                    batch_size=batch,
                    lr=float(cfg.lr) * recipe.get("lr_scale", 1.0),
                    max_length=int(cfg.max_length),
                    max_steps=steps,
                )
                set_adapter(model, wire)
                seed = derive_seed(cfg.seed, seeds.RECOVERY + 1 + 1000 * o, c, 0)
                local_train(model, tok, pf, items[c], spec, seed=seed)
                after = get_adapter(model)
                deltas.append({k: (after[k] - wire[k]).half().float() for k in wire})
                weights.append(n)
            seconds.append(time.perf_counter() - t0)
            s = score(ad.add(start, fedavg(deltas, weights)))
            if args.parts:
                print(f"  order {o}: {_parts(s)}", flush=True)
            utils.append(s["model_utility"] / oracle["model_utility"])
            closed.append((original["forget_Q_A_Prob"] - s["forget_Q_A_Prob"]) / gap)
        print(
            f"{recipe}: model_utility x oracle "
            + " ".join(f"{u:.3f}" for u in utils)
            + f" | mean {statistics.mean(utils):.3f} range {min(utils):.3f}-"
            f"{max(utils):.3f} | gap closed {statistics.mean(closed):.2f} | "
            f"client seconds {statistics.mean(seconds):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
