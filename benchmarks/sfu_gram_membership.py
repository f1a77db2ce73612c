"""Benchmark: how much an SFU Gram matrix reveals about a client's items.

    python benchmarks/sfu_gram_membership.py --run runs/tiny-fl --seeds 5

A remaining client of ``sfu`` sends, per adapted layer, G = Σ_i λ_i x_i x_iᵀ
over the tokens of its items (``layer-grams``, :mod:`fed_unlearn.subspace`).
The attacker here is the server: it holds the model with the global adapter, a
public reference set (the proxy retain people every party can generate) and
candidate items; it scores each candidate by how much more of its tokens'
energy G holds than the reference's Gram matrix
(:func:`~fed_unlearn.subspace.gram_membership_scores`, averaged over the
layers) and decides membership by thresholding. The figure is the ROC AUC of
that score, members against non-members of the same client (0.5 = chance).

Settings, each over ``--seeds`` random splits (a fresh λ draw each): ``item-M``,
a Gram matrix over M random items of client 0, the other items of client 0 as
non-members; ``person-50``, over 5 of its 10 people, the other 5 as
non-members. ``--run`` takes the FL-trained adapter of a run (``adapters/
original``) and its config; without it, the tiny preset's standard-suite data
with a fresh adapter (the base model's representations).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from clients.task import dataset
from clients.unlearn import proxy_retain_items
from fed_unlearn.config import RunConfig
from fed_unlearn.metrics.primitives import roc_auc
from fed_unlearn.models import (
    load_lora_model,
    prompt_formatter,
    resolve_model_dir,
    set_adapter,
)
from fed_unlearn.subspace import (
    gram_membership_scores,
    layer_input_grams,
    layer_token_inputs,
)

#: The standard suite's tiny federation (``simulations/suites/standard.toml``).
STANDARD = {
    "preset": "tiny",
    "num-clients": 10,
    "people-per-client": 10,
    "qa-per-person": 10,
    "holdout-people": 10,
    "domains": 5,
}


def main() -> None:
    """Print the AUC of each setting (mean ± sd over seeds, per-layer best)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run directory (FL-trained adapter)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--client", type=int, default=0)
    args = ap.parse_args()
    if args.run:
        flat = json.loads((args.run / "run.json").read_text())["config"]
    else:
        flat = STANDARD
    cfg = RunConfig.from_flat(flat).resolved()
    model, tok = load_lora_model(
        resolve_model_dir(cfg.preset, cfg.model_path or None), cfg.lora_spec()
    )
    if args.run:
        from safetensors.torch import load_file

        path = args.run / "adapters" / "original" / "adapter_model.safetensors"
        set_adapter(model, {k: v.float() for k, v in load_file(str(path)).items()})
    fmt = prompt_formatter(tok)
    length = int(cfg.max_length)
    items = dataset(cfg).clients[args.client]
    inputs = layer_token_inputs(model, tok, fmt, items, length)
    ref, _ = layer_input_grams(
        model, tok, fmt, proxy_retain_items(), length, torch.Generator().manual_seed(1)
    )
    people = sorted({it.person for it in items})
    settings = {"item-10": 10, "item-50": 50, "person-50": -1}
    print(
        f"client {args.client}: {len(items)} items of {len(people)} people, "
        f"{len(ref)} adapted layers, adapter: {'FL-trained' if args.run else 'fresh'}"
    )
    for name, m in settings.items():
        aucs, best = [], []
        for seed in range(args.seeds):
            rng = random.Random(seed)
            if m > 0:
                idx = list(range(len(items)))
                rng.shuffle(idx)
                mem, non = idx[:m], idx[m:]
            else:
                chosen = set(rng.sample(people, len(people) // 2))
                mem = [i for i, it in enumerate(items) if it.person in chosen]
                non = [i for i in range(len(items)) if i not in set(mem)]
            gen = torch.Generator().manual_seed(1000 + seed)
            gram, _ = layer_input_grams(
                model, tok, fmt, [items[i] for i in mem], length, gen
            )

            keys = sorted(gram)
            # per layer, every candidate's score; a candidate's score is their mean
            cand = mem + non
            table = torch.tensor(
                [
                    gram_membership_scores(
                        gram[k], ref[k], [inputs[i][k] for i in cand]
                    )
                    for k in keys
                ]
            )  # [layers, candidates]
            agg = table.mean(0).tolist()
            m_n = len(mem)
            # roc_auc: higher score = non-member, so negate (higher = member)
            aucs.append(roc_auc([-s for s in agg[:m_n]], [-s for s in agg[m_n:]]))
            per_layer = [
                roc_auc((-row[:m_n]).tolist(), (-row[m_n:]).tolist()) for row in table
            ]
            best.append(max(per_layer))
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        print(
            f"{name:10s} members {len(mem):3d} non-members {len(non):3d}: "
            f"AUC {statistics.mean(aucs):.3f} ± {sd:.3f} "
            f"(min {min(aucs):.3f}, max {max(aucs):.3f}); best single layer "
            f"{statistics.mean(best):.3f} (an optimistic, post-hoc choice)",
            flush=True,
        )


if __name__ == "__main__":
    main()
