"""Tell whether the installed packages are those of ``requirements.lock``.

    python -m simulations.lockcheck [LOCK]

Exits 0 when every package the lock pins is installed at its pinned version
(and torch at ``pyproject.toml``'s pin, which the lock leaves out), else 1 with
one line per difference and how to fix it. Packages installed beside the lock's
(pip itself, your own tools) are not checked. The README's install command and
``.ci/run`` install with ``-c requirements.lock``; ``.ci/refresh-lock`` regenerates
it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)")


def _norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """Return ``{normalised name: version}`` of the ``name==version`` lines of ``path``.

    Raises
    ------
    ValueError
        If a requirement line is not an exact ``==`` pin.
    """
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: not an exact pin (name==version): {raw!r}")
        pins[_norm(m.group(1))] = m.group(3)
    return pins


def _base(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0`` (a local label does not change the release)."""
    return version.split("+", 1)[0]


def _project_pins() -> dict[str, str]:
    """Exact ``==`` pins of ``pyproject.toml``'s dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"]:
        m = _PIN.match(dep)
        if m is not None:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def mismatches(lock: Path = LOCK) -> list[str]:
    """Differences between the installed packages and ``lock`` (empty if none)."""
    pins = read_lock(lock)
    for name, version in _project_pins().items():
        pins.setdefault(name, version)  # torch: pinned there, left out of the lock
    out = []
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed, the lock pins {want}")
            continue
        if have != want and _base(have) != want:
            out.append(f"{name}: installed {have}, the lock pins {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the differences with ``requirements.lock``; 1 if there are any."""
    args = sys.argv[1:] if argv is None else argv
    lock = Path(args[0]) if args else LOCK
    if not lock.is_file():
        print(f"lockcheck: no lock file at {lock}", file=sys.stderr)
        return 1
    bad = mismatches(lock)
    if not bad:
        print(f"lockcheck: installed packages match {lock.name}")
        return 0
    print(f"lockcheck: {len(bad)} installed package(s) differ from {lock}:")
    for line in bad:
        print(f"  {line}")
    print(
        "Reinstall from the lock: .venv/bin/pip install -c requirements.lock "
        '-e ".[dev]"\n'
        "or, to move to newer versions: .ci/refresh-lock, reinstall, run the "
        "tests, commit requirements.lock"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
