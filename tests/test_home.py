"""The test suite owns its caches: an empty HOME stays empty (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUN_CACHE_ROOT, RUN_CACHES, TEST_CACHE_ENV
from helpers import ROOT

#: A representative set: the tiny base built into the fed_unlearn cache and
#: a cached FL phase's directory, matplotlib (font cache), the CLI (flwr).
REPRESENTATIVE = [
    "tests/test_home.py::test_this_runs_caches_are_its_own",
    "tests/test_report.py",
    "tests/test_resume.py::test_cli_resume_refuses_a_finished_run_a_missing_log_and_a_refusing_method",
]


def test_this_runs_caches_are_its_own():
    from fed_unlearn.models import cache_root
    from fed_unlearn.models.tiny import TinySpec, tiny_dir
    from server.pipeline import runs_root

    home = Path.home()
    chosen = os.environ.get(TEST_CACHE_ENV)  # the opt-in, or this run's own
    for var in RUN_CACHES:
        if not (chosen and var == "FED_UNLEARN_CACHE"):
            assert Path(os.environ[var]).is_relative_to(RUN_CACHE_ROOT), var
    assert cache_root() == Path(chosen or RUN_CACHE_ROOT / "fed_unlearn")
    assert runs_root().is_relative_to(RUN_CACHE_ROOT)
    assert not RUN_CACHE_ROOT.is_relative_to(home)
    # a (very small) tiny base is built into this run's cache
    spec = TinySpec(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        pretrain_steps=0,
        fact_steps=0,
    )
    assert (tiny_dir(spec) / "done").is_file()
    assert tiny_dir(spec).is_relative_to(cache_root())


@pytest.mark.slow  # a second pytest process (about 2 minutes on 2 busy cores)
def test_a_test_run_with_an_empty_home_writes_nothing_there(tmp_path):
    home = tmp_path / "home"
    cache = home / ".cache"
    cache.mkdir(parents=True)
    cache.chmod(0o555)  # unwritable (root ignores it: the listing below decides)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in RUN_CACHES and k not in (TEST_CACHE_ENV, "HF_HOME", "TORCH_HOME")
    }
    env["HOME"] = str(home)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + REPRESENTATIVE,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    finally:
        cache.chmod(0o755)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
    assert written == [".cache"]
