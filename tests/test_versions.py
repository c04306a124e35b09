"""The tested range is one fact, stated alike in pyproject.toml (lower bounds), .ci/run (the floor pass) and
memwrap.versions (what `memwrap env` reports against), and `memwrap env` places a version in it correctly."""

import os
import re

import pytest

from memwrap.versions import TESTED, release, standing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_declared_lower_bounds_are_the_floors_ci_runs():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        bounds = dict(re.findall(r'"(torch|transformers)>=([\d.]+)"', f.read()))
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        floor_line = next(line for line in f if line.startswith("FLOOR="))
    pins = dict(re.findall(r"(torch|transformers)==([\d.]+)", floor_line))
    for package, (floor, _) in TESTED.items():
        assert release(bounds[package]) == release(floor) == release(pins[package]), (package, bounds, pins, floor)


@pytest.mark.parametrize("package", sorted(TESTED))
def test_standing_places_a_version_in_the_tested_range(package):
    floor, newest = TESTED[package]
    (fa, fb, _), (na, nb, nc) = release(floor), release(newest)
    assert release(floor) < release(newest)
    cases = {floor: "inside", newest: "inside", f"{newest}+cu130": "inside", f"{na}.{nb}.{nc + 1}": "newer",
             f"{na}.{nb + 1}.0rc1": "newer", f"{fa}.{fb - 1}.9" if fb else f"{fa - 1}.99.0": "older"}
    for version, expected in cases.items():
        assert standing(package, version).startswith(expected), (version, standing(package, version))


def test_release_reads_local_and_short_versions():
    assert release("2.14.1+cu130") == (2, 14, 1) and release("5.17") == (5, 17, 0) and release("2.15.0rc1") == (2, 15, 0)
    with pytest.raises(ValueError):
        release("latest")


def test_readme_states_the_tested_range():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for package, (floor, newest) in TESTED.items():
        assert f"{package} {floor} to {newest}" in text, package
