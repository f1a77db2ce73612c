"""The FL cache key: pinned for existing caches, and covering what changes a result."""

from __future__ import annotations

import os

import pytest

from fed_unlearn.config import ConfigError, RunConfig


def test_the_fl_cache_keys_of_existing_caches_do_not_move(monkeypatch):
    """Literals: the keys under which ~/.cache/fed_unlearn/runs holds phases made
    by earlier commits. A change here silently recomputes every cached phase (or,
    worse, would reuse one for a different config), so it must be deliberate.
    (Native numerics, whatever the shell running the tests chose.)"""
    monkeypatch.delenv("FED_UNLEARN_NUMERICS", raising=False)
    assert RunConfig(preset="tiny").fl_key(()) == "c95a6efb5133c173"
    assert RunConfig(preset="tiny").fl_key((2,)) == "998c22a314b45b14"
    assert RunConfig().fl_key(()) == "e172a8b182d1ad81"
    # settings that change no FL result keep the key
    same = RunConfig(preset="tiny", history_key_file="/k", eval_batch_size=3)
    assert same.fl_key(()) == "c95a6efb5133c173"


def _data(root, text="a"):
    (root / "client_0").mkdir(parents=True, exist_ok=True)
    (root / "client_0" / "forget.jsonl").write_text(text)
    (root / "general.jsonl").write_text("g")


def test_the_key_follows_the_data_content_not_its_path(tmp_path, monkeypatch):
    _data(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    absolute = RunConfig(preset="tiny", data_dir=str(tmp_path / "d")).fl_key(())
    relative = RunConfig(preset="tiny", data_dir="d").fl_key(())
    assert absolute == relative
    (tmp_path / "d" / "client_0" / "forget.jsonl").write_text("b")  # edited in place
    edited = RunConfig(preset="tiny", data_dir="d").fl_key(())
    assert edited != absolute
    os.rename(tmp_path / "d" / "general.jsonl", tmp_path / "d" / "general2.jsonl")
    assert RunConfig(preset="tiny", data_dir="d").fl_key(()) not in (absolute, edited)
    with pytest.raises(ConfigError, match="data-dir.*not a directory"):
        RunConfig(preset="tiny", data_dir=str(tmp_path / "none")).fl_key(())


def test_fault_injection_keys_are_in_the_key_and_notes_are_not():
    base = RunConfig.from_flat({"preset": "tiny"}).fl_key(())
    note = RunConfig.from_flat({"preset": "tiny", "x-note": "hi"}).fl_key(())
    fault = RunConfig.from_flat(
        {"preset": "tiny", "x-fault-client": 1, "x-fault-kind": "nan"}
    ).fl_key(())
    assert note == base
    assert fault != base
