"""requirements.lock: the installed packages are the locked ones."""

from importlib import metadata

import pytest

from simulations import lockcheck


def test_installed_packages_match_the_lock():
    bad = lockcheck.mismatches()
    assert not bad, (
        "installed packages differ from requirements.lock:\n  "
        + "\n  ".join(bad)
        + '\nreinstall with `.venv/bin/pip install -c requirements.lock -e ".[dev]"`'
        " or refresh the lock (.ci/refresh-lock, reinstall, test, commit)"
    )


def test_read_lock_parses_pins_and_refuses_ranges(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nFoo_Bar==1.2\n    # via x\nflwr[simulation]==1.41.0\n\n")
    assert lockcheck.read_lock(lock) == {"foo-bar": "1.2", "flwr": "1.41.0"}
    lock.write_text("a==1\nnumpy>=1.26\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: not an exact pin.*numpy>=1.26"):
        lockcheck.read_lock(lock)


def test_mismatches_name_each_difference(tmp_path):
    have = metadata.version("pytest")
    lock = tmp_path / "lock.txt"
    lock.write_text(
        f"pytest==0.0.1\nruff=={metadata.version('ruff')}\nno-such-package-xyz==1.0\n"
    )
    bad = lockcheck.mismatches(lock)
    assert f"pytest: installed {have}, the lock pins 0.0.1" in bad
    assert "no-such-package-xyz: not installed, the lock pins 1.0" in bad
    assert not any(line.startswith("ruff") for line in bad)
    assert lockcheck.main([str(lock)]) == 1
    assert lockcheck.main([str(tmp_path / "missing.txt")]) == 1
