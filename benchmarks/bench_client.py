"""Benchmark: ClientApp local-training throughput vs a bare peft+torch loop; history I/O.

Prints tokens/s of the real Flower ClientApp ``train`` handler (message decoding,
adapter loading, local training, reply encoding) and of a bare loop over exactly
the same batches, their ratio (goal >= 0.95), and the history store's write/read
speed and size per round (fp32 and fp16).

    python benchmarks/bench_client.py [--preset tiny|smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _message(state, cfg, server_round):
    from flwr.app import Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fed_unlearn.protocol import TrainRequest
    from server.channel import encode_request, run_record

    # Outside a SuperNode no task identity is set; the benchmark plays the SuperNode.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    content = encode_request(
        TrainRequest(state, server_round=server_round), run_record(cfg)
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def bench_training(preset: str, repeats: int) -> None:
    from flwr.app import Context, RecordDict

    from clients.client_app import train
    from clients.task import client_items, client_model
    from fed_unlearn.config import RunConfig
    from fed_unlearn.models import init_adapter, set_adapter
    from fed_unlearn.training import derive_seed, encode_items, make_batches

    cfg = RunConfig.from_flat({"preset": preset, "local-epochs": 1}).resolved()
    spec = cfg.train_spec()
    model, tok, pf = client_model(cfg)
    init = init_adapter(model, 0)
    node_config = {"partition-id": 0, "num-partitions": cfg.num_clients}
    items = client_items(cfg, node_config)
    ctx = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )

    app_tps, bare_tps = [], []

    def run_app() -> tuple[int, float]:
        msg = _message(init, cfg, server_round=1)
        t0 = time.perf_counter()
        reply = train(msg, ctx)
        return int(reply.content["metrics"]["tokens"]), time.perf_counter() - t0

    def run_bare() -> tuple[int, float]:
        # bare loop over exactly the same batches (same seed -> same order)
        set_adapter(model, init)
        enc = encode_items(tok, pf, items, spec.max_length)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 1, 0))
        batches = make_batches(enc, spec.batch_size, int(tok.pad_token_id), gen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        model.train()
        t1 = time.perf_counter()
        n = 0
        for b in batches:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += int(b["attention_mask"].sum())
        dt = time.perf_counter() - t1
        model.eval()
        return n, dt

    for rep in range(repeats + 1):  # first repetition is a warm-up
        # alternate the order so neither side always runs on a warmer machine
        first, second = (run_app, run_bare) if rep % 2 == 0 else (run_bare, run_app)
        r1, r2 = first(), second()
        (tokens, dt), (bare_tokens, bt) = (r1, r2) if first is run_app else (r2, r1)
        assert bare_tokens == tokens, (bare_tokens, tokens)
        if rep > 0:
            app_tps.append(tokens / dt)
            bare_tps.append(bare_tokens / bt)
    a, b = statistics.median(app_tps), statistics.median(bare_tps)
    print(
        f"preset={preset} items={len(items)} batch={spec.batch_size} tokens/round={tokens}"
    )
    print(f"ClientApp train handler : {a:10.1f} tokens/s (median of {repeats})")
    print(f"bare peft+torch loop    : {b:10.1f} tokens/s")
    print(f"ratio ClientApp / bare  : {a / b:10.3f}   (goal >= 0.95)")
    return init


def bench_history(
    adapter: dict[str, torch.Tensor], clients: int = 3, rounds: int = 5
) -> None:
    from fed_unlearn.history import HistoryStore, RoundRecord

    n_bytes = sum(t.numel() * 4 for t in adapter.values())
    for dtype in ("float32", "float16"):
        with tempfile.TemporaryDirectory() as tmp:
            store = HistoryStore(tmp, dtype=dtype)
            w, r, sizes = [], [], []
            for rnd in range(1, rounds + 1):
                deltas = {
                    c: {k: torch.randn_like(v) * 1e-3 for k, v in adapter.items()}
                    for c in range(clients)
                }
                rec = RoundRecord(
                    rnd,
                    adapter,
                    deltas,
                    dict.fromkeys(range(clients), 30),
                    list(range(clients)),
                    {},
                )
                t0 = time.perf_counter()
                sizes.append(store.append(rec))
                w.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.load(rnd)
                r.append(time.perf_counter() - t0)
            mb = sizes[-1] / 1e6
            print(
                f"history {dtype}: {mb:7.2f} MB/round ({clients} clients + global; adapter "
                f"{n_bytes / 1e6:.2f} MB fp32), write {mb / statistics.median(w):7.1f} MB/s, "
                f"read+validate {mb / statistics.median(r):7.1f} MB/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    init = bench_training(args.preset, args.repeats)
    bench_history(init)


if __name__ == "__main__":
    main()
