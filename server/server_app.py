"""Flower ServerApp: runs the fed_unlearn pipeline over the grid.

``app`` is what ``flwr run .`` starts (config from ``[tool.flwr.app.config]`` and
``--run-config``); :func:`make_server_app` builds the same app bound to a config
for ``flwr.simulation.run_simulation`` (used by the ``fed-unlearn`` CLI).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_unlearn.config import ResolvedConfig, RunConfig
from fed_unlearn.journal import UnlearnJournal
from server.pipeline import (
    PipelineOutput,
    federated_evaluate,
    run_pipeline,
    save_adapter,
    save_federation,
)

log = logging.getLogger(__name__)


def write_outputs(out: PipelineOutput, out_dir: Path) -> None:
    """Save the adapters (peft ``save_pretrained``) and ``pipeline.json``.

    Parameters
    ----------
    out : PipelineOutput
        Pipeline result.
    out_dir : Path
        Run directory.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(out.cfg, out.train.final, out_dir / "adapters" / "original")
    info: dict[str, Any] = {
        "train": {
            **out.train.stats,
            "path": str(out.train.path),
            "cached": out.train.cached,
        },
    }
    if out.retrain is not None:
        save_adapter(out.cfg, out.retrain.final, out_dir / "adapters" / "retrain")
        info["retrain"] = {
            **out.retrain.stats,
            "path": str(out.retrain.path),
            "cached": out.retrain.cached,
        }
    if out.unlearned is not None:
        save_adapter(out.cfg, out.unlearned, out_dir / "adapters" / "unlearned")
        info["unlearn"] = out.unlearn_stats
    (out_dir / "pipeline.json").write_text(json.dumps(info, indent=2, default=str))
    if out.unlearned is not None and out.cfg.receipt_key_file:
        write_receipt(out, out_dir)
    if out.unlearned is not None and out.federation is not None:
        # the departure is done: the federation forgets these clients from now on
        stats = out.unlearn_stats
        index = out.train.history.record_unlearning(
            list(out.cfg.departed()),
            out.unlearned,
            {
                "method": stats["method"],
                "requested_at": stats["requested_at"],
                "finished_at": stats["finished_at"],
                "wire_bytes": stats["bytes"],
                "run_dir": str(out_dir),
            },
        )
        log.info("fed-unlearn: %s records unlearning #%d", out.federation, index)


def write_receipt(out: PipelineOutput, out_dir: Path) -> Path:
    """Sign and write ``receipt.json`` for the unlearning in ``out``.

    Parameters
    ----------
    out : PipelineOutput
        Pipeline result with an unlearned adapter (saved under ``out_dir``).
    out_dir : Path
        Run directory.

    Returns
    -------
    Path
        The receipt's path.
    """
    from fed_unlearn.receipt import build_receipt, load_signing_key

    stats = out.unlearn_stats
    receipt = build_receipt(
        departed=list(out.cfg.departed()),
        method=stats["method"],
        method_config=stats["method_config"],
        run_config=out.cfg.to_flat(),
        history=out.train.history,
        adapter_before=out_dir / "adapters" / "original",
        adapter_after=out_dir / "adapters" / "unlearned",
        requested_at=stats["requested_at"],
        finished_at=stats["finished_at"],
        wire_bytes=stats["bytes"],
        unlearn_rounds=stats["rounds"],
        key=load_signing_key(out.cfg.receipt_key_file),
    )
    path = out_dir / "receipt.json"
    path.write_text(json.dumps(receipt, indent=1))
    log.info("fed-unlearn: wrote %s", path)
    return path


def make_server_app(
    cfg: ResolvedConfig,
    steps: tuple[str, ...],
    state: dict[str, Any],
    on_round: Any = None,
    federation: Path | None = None,
    journal: UnlearnJournal | None = None,
) -> ServerApp:
    """Build a ServerApp bound to ``cfg`` for ``run_simulation``.

    Parameters
    ----------
    cfg : ResolvedConfig
        The run's configuration.
    steps : tuple[str, ...]
        Pipeline steps.
    state : dict[str, Any]
        Filled with ``"output"`` (PipelineOutput) or ``"error"`` (exception), since
        ``run_simulation`` does not return the ServerApp's result.
    on_round : Callable, optional
        Progress callback ``(phase, round, info)``.
    federation : Path, optional
        A saved federation to depart from.
    journal : UnlearnJournal, optional
        The run's per-round unlearning log (``server.pipeline.run_pipeline``).

    Returns
    -------
    ServerApp
        The app.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            state["output"] = run_pipeline(
                grid, cfg, steps, on_round, federation, journal
            )
        except BaseException as exc:  # noqa: BLE001 - handed back to the CLI thread
            state["error"] = exc
            state["traceback"] = traceback.format_exc()

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .`` entry point: pipeline + adapters + ``pipeline.json``.

    ``mode`` (run config) picks the job: ``run`` (FL, departure, unlearning,
    oracle), ``train`` (FL; the history is kept in ``federation-dir``) or
    ``forget`` (a later, separate run: the departure of ``depart`` from
    ``federation-dir``, no FL).
    """
    cfg = RunConfig.from_flat(dict(context.run_config)).resolved()  # once per run
    out_dir = Path(cfg.out_dir)
    fed_dir = Path(cfg.federation_dir) if cfg.federation_dir else None
    if cfg.mode == "train":
        assert fed_dir is not None
        out = run_pipeline(grid, cfg, ("train",))
        save_federation(out.train, fed_dir.parent, name=fed_dir.name)
        write_outputs(out, out_dir)
        log.info("fed-unlearn: federation kept in %s", fed_dir)
        return
    federation = fed_dir if cfg.mode == "forget" else None
    out = run_pipeline(grid, cfg, ("train", "unlearn"), federation=federation)
    write_outputs(out, out_dir)
    assert out.grid is not None and out.node_map is not None
    assert out.unlearned is not None and out.retrain is not None
    fed = federated_evaluate(
        out.grid,
        cfg,
        out.node_map,
        {
            "original": out.train.final,
            "unlearned": out.unlearned,
            "retrain": out.retrain.final,
        },
    )
    (out_dir / "federated_eval.json").write_text(json.dumps(fed, indent=2))
    log.info("fed-unlearn: wrote %s (federated evaluation: %s)", out_dir, fed)
