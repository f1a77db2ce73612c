"""The numerics mode: what it sets, its cache keys, its errors, and that it makes a
tiny-base build bit-identical across thread counts and MKL instruction sets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fed_unlearn import numerics
from fed_unlearn.config import RunConfig
from fed_unlearn.models.tiny import TinySpec

ROOT = Path(__file__).resolve().parent.parent

#: builds a short tiny base in a fresh cache and prints the sha256 of its weights
BUILD = """
import hashlib, os, sys, tempfile
os.environ["FED_UNLEARN_CACHE"] = tempfile.mkdtemp()
import torch
torch.set_num_threads(int(sys.argv[1]))
from safetensors.torch import load_file
from fed_unlearn.models.tiny import TinySpec, tiny_dir
d = tiny_dir(TinySpec(pretrain_steps=12, fact_steps=2))
sd = load_file(str(d / "model.safetensors"))
h = hashlib.sha256()
for k in sorted(sd):
    h.update(sd[k].contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def _build(threads: int, **env: str) -> str:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in (numerics.MODE_ENV, *numerics.REPRODUCIBLE_ENV)
        and k not in ("MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, str(threads)],
        env={**clean, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def _cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


needs_mkl = pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="the sources found are MKL's"
)


@needs_mkl
def test_the_reproducible_mode_gives_the_same_base_for_any_threads_and_isa():
    """1 thread, and 2 threads with MKL held to AVX2 (another machine's code path):
    the same weights, bit for bit, in the reproducible mode."""
    repro = {numerics.MODE_ENV: "reproducible"}
    one = _build(1, **repro)
    other_machine = _build(2, MKL_ENABLE_INSTRUCTIONS="AVX2", **repro)
    assert one == other_machine


@needs_mkl
@pytest.mark.skipif(
    _cpu_vendor() != "GenuineIntel",
    reason="MKL splits its GEMM sums by thread count on Intel CPUs; on others "
    "(AMD EPYC) its native 1- and 2-thread results agree",
)
def test_natively_one_and_two_threads_differ_the_source_the_mode_removes():
    assert _build(1) != _build(2)


def test_the_mode_is_native_unless_asked_and_a_bad_value_names_the_variable(
    monkeypatch,
):
    monkeypatch.delenv(numerics.MODE_ENV, raising=False)
    assert numerics.mode() == "native"
    assert numerics.cache_tag() == ""
    monkeypatch.setenv(numerics.MODE_ENV, " Reproducible ")
    assert numerics.mode() == "reproducible"
    monkeypatch.setenv(numerics.MODE_ENV, "exact")
    with pytest.raises(numerics.NumericsError, match="FED_UNLEARN_NUMERICS='exact'"):
        numerics.mode()


def test_apply_sets_what_is_unset_and_keeps_the_users_values(monkeypatch):
    for k in numerics.REPRODUCIBLE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(numerics.MODE_ENV, "native")
    numerics.apply()
    assert not any(k in os.environ for k in numerics.REPRODUCIBLE_ENV)
    monkeypatch.setenv(numerics.MODE_ENV, "reproducible")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with pytest.warns(RuntimeWarning, match="after torch was imported"):
        numerics.apply()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert numerics.cache_tag() == (
        "reproducible:ATEN_CPU_CAPABILITY=avx2,MKL_CBWR=COMPATIBLE"
    )


def test_a_reproducible_run_never_shares_a_cache_with_a_native_one(monkeypatch):
    monkeypatch.delenv(numerics.MODE_ENV, raising=False)
    native = (RunConfig(preset="tiny").fl_key(()), TinySpec().key())
    monkeypatch.setenv(numerics.MODE_ENV, "reproducible")
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    repro = (RunConfig(preset="tiny").fl_key(()), TinySpec().key())
    assert repro[0] != native[0] and repro[1] != native[1]
    # the tag is the mode with its variables, hashed like the rest of the recipe
    recipe = {**TinySpec().__dict__, "v": 10, "py": sys.version_info[:2]}
    recipe["numerics"] = "reproducible:ATEN_CPU_CAPABILITY=avx2,MKL_CBWR=AVX2,STRICT"
    blob = json.dumps(recipe, sort_keys=True).encode()
    assert repro[1] == hashlib.sha256(blob).hexdigest()[:12]


def test_the_cli_refuses_a_bad_mode_in_one_line(monkeypatch, capsys):
    from simulations.cli import main

    monkeypatch.setenv(numerics.MODE_ENV, "fast")
    assert main(["methods"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FED_UNLEARN_NUMERICS='fast'" in err[0]


def test_describe_records_the_mode_and_the_code_path(monkeypatch):
    monkeypatch.setenv(numerics.MODE_ENV, "native")
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    d = numerics.describe()
    assert d["mode"] == "native"
    assert d["MKL_CBWR"] == "AVX2,STRICT"
    assert d["torch_threads"] == torch.get_num_threads()
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
