"""The torch and transformers versions memwrap is tested with.

CI runs the whole suite on whatever pip resolves for a fresh `pip install ".[test]"` (the newest releases) and a fast
pass pinned to the floors, which are the lower bounds pyproject.toml declares. `memwrap env` says where the installed
versions stand. Raise a floor only together with pyproject.toml and .ci/run (tests/test_packaging.py checks all three).
"""

from __future__ import annotations

import re

# package -> (floor: declared lower bound, run by CI's floor pass; newest release CI has run and kept green)
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11.0", "2.14.1"),
    "transformers": ("5.17.0", "5.25.0"),
}


def release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; local and pre-release tags are ignored ('2.14.1+cu130' -> 2.14.1)."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p or 0) for p in m.groups())


def standing(package: str, installed: str) -> str:
    """Where an installed version stands against the tested range, in words a bug report can carry."""
    floor, newest = TESTED[package]
    v = release(installed)
    if v < release(floor):
        return f"older than memwrap's floor {floor}: unsupported, upgrade ({package}>={floor})"
    if v > release(newest):
        return f"newer than the newest tested ({newest}): expected to work, not yet run by CI"
    return f"inside the tested range {floor} .. {newest}"
