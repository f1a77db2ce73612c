"""Benchmark: the full TOFU-style evaluation on ~400 items (goal <= 2 min, SmolLM2).

    python benchmarks/bench_eval.py [--preset smollm2|tiny] [--items 400]

Prints wall time of `fed_unlearn.metrics.evaluate` (all default metrics: probs,
ROUGE with greedy generation, truth ratios, MIA family, EM/ES, fluency) on 120
forget, 120 retain, 120 holdout items and 40 general probes, with a non-zero LoRA
adapter (evaluated merged, as the CLI does).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    from fed_unlearn.config import RunConfig
    from fed_unlearn.data import generate_tofu
    from fed_unlearn.metrics import EvalSplits, evaluate
    from fed_unlearn.models import (
        init_adapter,
        load_lora_model,
        prompt_formatter,
        resolve_model_dir,
    )

    cfg = RunConfig.from_flat({"preset": args.preset}).resolved()
    model, tok = load_lora_model(resolve_model_dir(cfg.preset), cfg.lora_spec())
    init_adapter(model, 0)
    # a trained-looking adapter (peft's B = 0 would make LoRA a no-op)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    # 400 items: up to 40 general probes, the rest split evenly over forget /
    # retain / holdout people (10 Q/A each)
    n_general = min(40, args.items // 10)
    per = max(1, (args.items - n_general) // 30)
    data = generate_tofu(
        0,
        2,
        people_per_client=per,
        num_holdout_people=per,
        num_general=n_general,
    )
    splits = EvalSplits(
        forget=data.clients[0],
        retain=data.clients[1],
        holdout=data.holdout,
        general=data.general,
    )
    n = sum(
        len(x) for x in (splits.forget, splits.retain, splits.holdout, splits.general)
    )
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    _, summary = evaluate(
        model,
        tok,
        prompt_formatter(tok),
        splits,
        max_new_tokens=args.max_new_tokens,
        max_length=96,
    )
    dt = time.perf_counter() - t0
    print(
        f"preset={args.preset} items={n} (forget {len(splits.forget)}, retain "
        f"{len(splits.retain)}, holdout {len(splits.holdout)}, general {len(splits.general)})"
    )
    print(
        f"full evaluation: {dt:.1f} s  ({n / dt:.2f} items/s; goal: 400 items <= 120 s)"
    )
    print({k: round(v, 4) for k, v in summary.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
