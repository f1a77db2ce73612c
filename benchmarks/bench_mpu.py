"""Benchmark: MPU against the same inner loss run noise-free on the clean adapter.

    python benchmarks/bench_mpu.py [--preset tiny|smollm2] [--loss npo] [--rounds 2]

Needs the cached FL phases of the default run of that preset (run
``fed-unlearn run --preset P --out DIR`` once). No Flower here: the client side is
the very code the ClientApp runs (``fed_unlearn.losses.unlearn_train`` on every
copy) and the server side is ``fed_unlearn.mpu_ops``; what differs from a real run
is only the transport. For κ ∈ {0.01, 0.05, 0.1} and m ∈ {2, 3} it prints

- forget / retain ``Q_A_Prob`` and model utility of the result, and the utility
  degradation relative to the noise-free run (goal: ≤ 0.5 % at κ = 0.1);
- client compute (local steps, seconds) and the server's pre/post-processing time
  as a share of a round (goal ≤ 2 %);
- what MPU hides and what it does not: the relative distance to the clean adapter
  of a single copy, of the plain average of the copies (factor space, gauge
  coordinates), and of the average of the copies' products B'A' (gauge
  invariant: the gauge cannot hide it; only the noise does). MPU is obfuscation,
  not differential privacy.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def leakage(
    theta: dict[str, torch.Tensor], copies: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Relative errors of naive estimates of the clean adapter from the copies."""
    from fed_unlearn.adapters import flatten, lora_pairs

    flat = flatten(theta)
    single = _rel(flatten(copies[0]), flat)
    avg = _rel(sum(flatten(c) for c in copies) / len(copies), flat)  # type: ignore[arg-type]
    num = den = 0.0
    one = 0.0
    for _prefix, (a, b) in lora_pairs(theta).items():
        clean = theta[b] @ theta[a]
        prods = [c[b] @ c[a] for c in copies]
        num += float(((sum(prods) / len(prods)) - clean).norm() ** 2)  # type: ignore[operator]
        one += float((prods[0] - clean).norm() ** 2)
        den += float(clean.norm() ** 2)
    return {
        "single_copy_factor_err": single,
        "avg_copies_factor_err": avg,
        "single_copy_product_err": (one / den) ** 0.5,
        "avg_copies_product_err": (num / den) ** 0.5,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--loss", default="npo")
    ap.add_argument("--retain", default="proxy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr-scale", type=float, default=0.1)
    ap.add_argument("--kappas", default="0.01,0.05,0.1")
    ap.add_argument("--ms", default="2,3")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    from clients.task import dataset
    from clients.unlearn import proxy_retain_items
    from fed_unlearn.config import RunConfig
    from fed_unlearn.losses import unlearn_train
    from fed_unlearn.metrics import evaluate
    from fed_unlearn.models import (
        get_adapter,
        load_lora_model,
        prompt_formatter,
        resolve_model_dir,
        set_adapter,
    )
    from fed_unlearn.mpu_ops import draw_secrets, merge_returned, prepare_copies
    from fed_unlearn.training import derive_seed
    from server.pipeline import load_phase
    from simulations.runner import eval_options, eval_splits

    cfg = RunConfig.from_flat({"preset": args.preset}).resolved()
    phase = load_phase(cfg, ())
    retrain = load_phase(cfg, cfg.departed())
    if phase is None or retrain is None:
        raise SystemExit(
            f"no cached FL phases for the default {args.preset} run; run "
            f"'fed-unlearn run --preset {args.preset} --out DIR' first"
        )
    spec = cfg.train_spec()
    spec = type(spec)(
        epochs=args.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr * args.lr_scale,
        max_length=spec.max_length,
    )
    model, tok = load_lora_model(resolve_model_dir(cfg.preset), cfg.lora_spec())
    pf = prompt_formatter(tok)
    data = dataset(cfg)
    forget = data.forget_items(cfg.departed())
    retain_items = proxy_retain_items() if args.retain == "proxy" else None
    splits = eval_splits(cfg)

    def score(state: dict[str, torch.Tensor]) -> dict[str, float]:
        set_adapter(model, state)
        _, summary = evaluate(model, tok, pf, splits, reference, **eval_options(cfg))
        out = {
            k: float(summary[k])
            for k in (
                "forget_Q_A_Prob",
                "forget_quality",
                "retain_Q_A_Prob",
                "gk_Q_A_Prob",
                "model_utility",
            )
            if summary.get(k) is not None
        }
        # Utility: model_utility, or (where it is 0, as on tiny) the harmonic
        # mean of the retain and general-knowledge probabilities as a proxy.
        a, b = out.get("retain_Q_A_Prob", 0.0), out.get("gk_Q_A_Prob", 0.0)
        proxy = 2 * a * b / (a + b) if a + b > 0 else 0.0
        out["utility"] = out.get("model_utility") or proxy
        return out

    def client(copy: dict[str, torch.Tensor], seed: int) -> tuple[dict, Any]:
        set_adapter(model, copy)
        stats = unlearn_train(
            model,
            tok,
            pf,
            forget,
            args.loss,
            spec,
            seed=seed,
            retain_items=retain_items,
        )
        after = get_adapter(model)
        return {k: after[k] - copy[k] for k in copy}, stats

    def run(kappa: float | None, m: int) -> dict[str, Any]:
        theta = {k: v.clone() for k, v in phase.final.items()}
        pre = post = client_s = 0.0
        steps = 0
        leak: dict[str, float] = {}
        for rnd in range(1, args.rounds + 1):
            if kappa is None:  # noise-free: the clean adapter, one copy
                delta, st = client(theta, derive_seed(0, rnd, 0))
                client_s += st.seconds
                steps += st.steps
            else:
                t0 = time.perf_counter()
                sec = draw_secrets(m, "random", seed=derive_seed(1, rnd, m))
                copies, rinfo = prepare_copies(theta, m, kappa, sec)
                pre += time.perf_counter() - t0
                if rnd == 1:
                    leak = leakage(theta, copies)
                returned = []
                for k, c in enumerate(copies):
                    d, st = client(c, derive_seed(0, rnd, k))
                    returned.append(d)
                    client_s += st.seconds
                    steps += st.steps
                t0 = time.perf_counter()
                delta = merge_returned(returned, rinfo, theta)
                post += time.perf_counter() - t0
            theta = {k: theta[k] + delta[k] for k in theta}
        row = {
            "kappa": kappa,
            "m": m,
            **score(theta),
            "local_steps": steps,
            "client_seconds": client_s,
            "server_pre_s": pre,
            "server_post_s": post,
            "server_share_of_round": (pre + post) / max(client_s + pre + post, 1e-9),
            **leak,
        }
        print(json.dumps(row), flush=True)
        return row

    print(
        f"preset {args.preset}, inner loss {args.loss}, retain {args.retain}, "
        f"{args.rounds} rounds x {args.epochs} epochs"
    )
    reference = None
    print("retrain:", json.dumps(score(retrain.final)))
    set_adapter(model, retrain.final)
    reference, _ = evaluate(model, tok, pf, splits, None, **eval_options(cfg))
    print("before:", json.dumps(score(phase.final)))
    rows = [run(None, 1)]
    clean_mu = rows[0].get("utility")
    for m in [int(x) for x in args.ms.split(",")]:
        for kappa in [float(x) for x in args.kappas.split(",")]:
            row = run(kappa, m)
            if clean_mu:
                row["utility_degradation"] = (clean_mu - row["utility"]) / clean_mu
                print(
                    f"  kappa {kappa} m {m}: utility degradation "
                    f"{100 * row['utility_degradation']:.2f}%"
                )
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
