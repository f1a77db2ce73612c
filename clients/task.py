"""What a client loads: its model copy, its private data, its identity."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_unlearn.config import AnyConfig
from fed_unlearn.data import TofuData, generate_tofu, load_data_dir, load_jsonl
from fed_unlearn.data.audit import split_audit
from fed_unlearn.models import (
    cache_root,
    load_lora_model,
    prompt_formatter,
    resolve_model_dir,
)
from fed_unlearn.types import QAItem


def client_id(node_config: Mapping[str, Any]) -> int:
    """Return this node's client id (its ``partition-id``).

    Parameters
    ----------
    node_config : Mapping[str, Any]
        ``context.node_config``.

    Returns
    -------
    int
        The id.

    Raises
    ------
    ValueError
        If the node was started without ``partition-id``.
    """
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config partition-id=<i>"
        )
    return int(node_config["partition-id"])


@functools.lru_cache(maxsize=4)
def synthetic_data(
    seed: int,
    num_clients: int,
    people: int,
    holdout: int,
    qa: int,
    general: int,
    domains: int = 0,
) -> TofuData:
    """Deterministic synthetic TOFU data (cached per process)."""
    return generate_tofu(
        seed,
        num_clients,
        people_per_client=people,
        num_holdout_people=holdout,
        qa_per_person=qa,
        num_general=general,
        domains=domains,
    )


def dataset(cfg: AnyConfig) -> TofuData:
    """Return the data set of a simulation as FL trains it (clients' trained items).

    With ``audit-fraction`` > 0 each client's items are those it trains on;
    the never-trained rest is :func:`client_audit_items`'s.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        Run configuration.

    Returns
    -------
    TofuData
        :func:`full_dataset` with each client's audit items removed.
    """
    data = full_dataset(cfg)
    if not cfg.audit_fraction:
        return data
    return dataclasses.replace(
        data,
        clients={
            c: split_audit(items, cfg.audit_fraction, cfg.seed)[0]
            for c, items in data.clients.items()
        },
    )


def full_dataset(cfg: AnyConfig) -> TofuData:
    """Return the whole data set of a simulation (a client reads only its part).

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        Run configuration.

    Returns
    -------
    TofuData
        From ``data-dir`` if set, else generated from the seed.
    """
    if cfg.data_dir:
        return load_data_dir(cfg.data_dir, cfg.num_clients)
    return synthetic_data(
        cfg.seed,
        cfg.num_clients,
        cfg.people_per_client,
        cfg.holdout_people,
        cfg.qa_per_person,
        cfg.general_probes,
        cfg.domains,
    )


def reads_node_data(node_config: Mapping[str, Any]) -> bool:
    """Return whether this node reads its own ``data-path`` (a deployment's data).

    Parameters
    ----------
    node_config : Mapping[str, Any]
        ``context.node_config``.

    Returns
    -------
    bool
        ``True`` when the node config names a ``data-path``; ``False`` when the
        client takes its partition of the run's data set (:func:`dataset`).
    """
    return bool(node_config.get("data-path"))


def node_data_version(node_config: Mapping[str, Any]) -> int:
    """Return an opaque tag of this node's own data: 0 without a ``data-path``.

    The tag is a keyed hash, HMAC-SHA256 of the ``data-path`` file's bytes under a
    random secret that never leaves the node (made with :mod:`secrets` on first
    use, kept with mode 0600 in ``<cache>/node-secrets/``), cut to 56 bits and
    made non-zero. It is the same while the file is unchanged and differs when
    it changes, so the server can key its FL cache on it; without the secret it
    cannot be tested against candidate data sets, so it tells the server
    nothing else about the data.

    Parameters
    ----------
    node_config : Mapping[str, Any]
        ``context.node_config``.

    Returns
    -------
    int
        0 when the node takes its partition of the run's data set, else the tag
        (in ``[2**56, 2**57)``).
    """
    if not reads_node_data(node_config):
        return 0
    path = Path(str(node_config["data-path"])).resolve()
    mac = hmac.new(_node_secret(path), path.read_bytes(), hashlib.sha256).digest()
    return int.from_bytes(mac[:7], "big") | (1 << 56)


def _node_secret(data_path: Path) -> bytes:
    """Return the node's secret for the tag of ``data_path`` (made on first use)."""
    name = hashlib.sha256(str(data_path).encode()).hexdigest()[:24]
    path = cache_root() / "node-secrets" / f"{name}.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.part{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # the first node to get there wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def client_items(cfg: AnyConfig, node_config: Mapping[str, Any]) -> list[QAItem]:
    """Return this client's private training items (without its audit items)."""
    return split_audit(_own_items(cfg, node_config), cfg.audit_fraction, cfg.seed)[0]


def client_audit_items(cfg: AnyConfig, node_config: Mapping[str, Any]) -> list[QAItem]:
    """Return the items this client kept out of FL training (``audit-fraction``)."""
    return split_audit(_own_items(cfg, node_config), cfg.audit_fraction, cfg.seed)[1]


def _own_items(cfg: AnyConfig, node_config: Mapping[str, Any]) -> list[QAItem]:
    """Return all of this client's private items.

    A SuperNode started with ``--node-config "partition-id=0 data-path=..."`` reads
    its own JSONL file; otherwise the client takes its partition of :func:`dataset`.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        Run configuration.
    node_config : Mapping[str, Any]
        ``context.node_config``.

    Returns
    -------
    list[QAItem]
        The items.
    """
    if reads_node_data(node_config):
        return load_jsonl(str(node_config["data-path"]))
    cid = client_id(node_config)
    data = full_dataset(cfg)
    if cid not in data.clients:
        raise ValueError(
            f"client {cid} has no data (data set has clients {sorted(data.clients)})"
        )
    return data.clients[cid]


def client_model(cfg: AnyConfig) -> tuple[Any, Any, Any]:
    """Return the process-wide LoRA model, tokenizer and prompt format."""
    model_dir = resolve_model_dir(cfg.preset, cfg.model_path or None)
    model, tok = load_lora_model(model_dir, cfg.lora_spec())
    return model, tok, prompt_formatter(tok)
