"""The Flower app package (FAB) that ``flwr run`` ships carries code only."""

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("fed_unlearn/", "clients/", "server/")


def _names(app: Path) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as z:
        return z.namelist()


def _only_code(names: list[str]) -> list[str]:
    return [
        n
        for n in names
        if n not in ("pyproject.toml", ".info/CONTENT")
        and not (n.endswith(".py") and n.startswith(APP_PACKAGES))
    ]


def test_fab_holds_the_app_code_and_nothing_a_user_keeps_beside_it(tmp_path):
    app = tmp_path / "fedunlearn"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file():
            (app / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, app / rel)
    # what a user keeps in the project folder: client data, results, history,
    # keys; every one of these has a suffix flwr packages by default
    planted = {
        "data/client_0.jsonl": '{"question": "CANARY-Q", "answer": "CANARY-A"}\n',
        "client_1.jsonl": '{"question": "CANARY-Q"}\n',
        "runs/r1/TOFU_EVAL.json": '{"forget": ["CANARY"]}',
        "runs/r1/run.json": "{}",
        "history/fl-1/meta.json": "{}",
        "keys/server.yaml": "secret: CANARY",
        "notes.md": "CANARY",
        "fed_unlearn/leftover.json": "{}",
    }
    for rel, text in planted.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    names = _names(app)
    assert _only_code(names) == []
    assert not set(planted) & set(names)
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as z:
        for n in names:
            assert b"CANARY" not in z.read(n), n
    # and the code the apps import is all there
    for rel in tracked:
        if rel.endswith(".py") and rel.startswith(APP_PACKAGES):
            assert rel in names, rel
    assert "clients/client_app.py" in names and "server/server_app.py" in names


def test_fab_of_this_checkout_is_code_only():
    # the working tree as it is (with .venv, caches or runs a developer keeps)
    assert _only_code(_names(ROOT)) == []
