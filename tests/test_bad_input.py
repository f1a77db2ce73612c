"""Bad input at the CLI: exit status 2, one readable line, nothing written."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--depart", "5"], "client(s) [5] never joined"),
        (["--depart", "0,1,2"], "at least one client must remain"),
        (["--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--set", "num-client=3"], "unknown config key(s) ['num-client']"),
        (["--set", "lr"], "expected KEY=VALUE"),
        (["--method", "foul9"], "unknown method 'foul9'"),
        (["--model", "/nonexistent/model"], "not a Hugging Face model directory"),
        (["--aggregation", "median"], "aggregation"),
    ],
)
def test_bad_run_arguments(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    rc = main(["run", "--preset", "tiny", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert (
        len(err) == 1 and err[0].startswith("fed-unlearn: error:") and needle in err[0]
    )
    assert not out.exists()


def test_malformed_client_data_names_file_line_and_field(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "client_0.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (data / "client_1.jsonl").write_text('{"question": "q2", "answer": 3}\n')
    rc = main(
        [
            "run",
            "--preset",
            "tiny",
            "--clients",
            "2",
            "--depart",
            "1",
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "client_1.jsonl line 1" in err and "'answer'" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {}}))
    rc = main(["run", "--preset", "tiny", "--out", str(out)])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text()) == {"config": {}}


def test_unlearn_needs_a_run_directory(tmp_path, capsys):
    rc = main(["unlearn", str(tmp_path), "--out", str(tmp_path / "x")])
    assert rc == 2 and "no run.json" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    from fed_unlearn.losses import LOSSES
    from fed_unlearn.methods import METHOD_REGISTRY

    lines = capsys.readouterr().out.strip().splitlines()
    split = next(i for i, ln in enumerate(lines) if ln.startswith("inner losses"))
    methods = [ln.split()[0] for ln in lines[1:split]]
    losses = [ln.split()[0] for ln in lines[split + 1 :]]
    assert methods == sorted(METHOD_REGISTRY) and "foul" in methods
    assert losses == sorted(LOSSES) and "npo" in losses


def test_config_files_are_read_and_checked(tmp_path, capsys):
    from pathlib import Path

    from simulations.cli import build_config, parser

    root = Path(__file__).resolve().parent.parent
    args = parser().parse_args(
        [
            "run",
            "--config",
            str(root / "simulations/configs/tiny.toml"),
            "--seed",
            "4",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    cfg = build_config(args)
    assert (cfg.preset, cfg.num_server_rounds, cfg.seed) == ("tiny", 4, 4)  # flags win
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\nnum-round = 3\n')
    rc = main(["run", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and "num-round" in capsys.readouterr().err


@pytest.mark.parametrize(
    "query",
    [
        {"budget": 0.1, "max-steps": 0},  # no step cap to spread it over
        {"budget": 0.1, "max-steps": 2, "batch-size": 8},  # two batch rules
    ],
)
def test_client_refuses_a_budget_it_cannot_size_before_any_work(query):
    """A local-update request with a budget sizes its own batches: one without
    a step cap, or with a batch size too, is refused with a clear error when
    the client decodes it, before it reads its data or loads its model."""
    import torch

    from fed_unlearn.protocol import ProtocolError, decode_request

    fields = {"kind": "local-update", "loss": "nll", **query}
    with pytest.raises(ProtocolError, match="'budget' request sizes its own batches"):
        decode_request(fields, {"copy0.w": torch.zeros(2)})
