"""`import memwrap.adapters` works after `pip install .` and after `pip install -e .` (adapters/ is mapped); the
built wheel and sdist hold the package and nothing foreign; every file the README links is in the repository."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True])
def test_adapters_package_importable_after_install(tmp_path, editable):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "tools",
                                                                           "__pycache__", ".pytest_cache"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # torch, transformers, ... come from this interpreter's site-packages, appended after the venv's own
    site_dir = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # ... seen through a view without memwrap itself, so an installed copy there cannot shadow the one under test
    views = []
    for i, parent in enumerate(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)):
        view = tmp_path / f"parent-view-{i}"
        view.mkdir()
        for entry in os.listdir(parent):
            if not entry.lower().startswith(("memwrap", "__editable__")):
                os.symlink(os.path.join(parent, entry), view / entry)
        views.append(str(view))
    with open(os.path.join(site_dir, "zz_parent_env.pth"), "w") as f:
        f.write("\n".join(views) + "\n")
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps"] + (["-e", str(src)] if editable else [str(src)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = ("import memwrap, memwrap.adapters, os; from memwrap.adapters import resolve; "
             "print(os.path.realpath(memwrap.adapters.__file__)); print(memwrap.__file__)")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    adapters_file, memwrap_file = out.stdout.split()
    assert adapters_file.endswith(os.path.join("adapters", "__init__.py"))
    if editable:  # the source tree itself is used
        assert adapters_file.startswith(str(src)) and memwrap_file.startswith(str(src))
    else:  # a copy in the venv's site-packages
        assert "site-packages" in memwrap_file and not memwrap_file.startswith(str(src))
    script = env_dir / "bin" / "memwrap"
    assert subprocess.run([str(script), "--help"], capture_output=True, timeout=120).returncode == 0


def tracked_files() -> list[str]:
    """The files git tracks here (what a clone holds); skips the test outside a git checkout."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.split("\0") if f]


def package_sources() -> set[str]:
    """memwrap/**.py, adapters as memwrap/adapters, and the bundled JSON files, as the wheel must name them."""
    out = set()
    for f in tracked_files():
        if f.startswith("adapters/") and f.endswith(".py"):
            out.add("memwrap/" + f)
        elif f.startswith("memwrap/") and (f.endswith(".py") or f.startswith("memwrap/planning/") and f.endswith(".json")):
            out.add(f)
    return out


@pytest.mark.slow
def test_build_gives_a_wheel_and_an_sdist_with_the_package_and_no_tests_or_data(tmp_path):
    """`python -m build` on the files a clone holds: the wheel holds every memwrap module, memwrap.adapters and the
    bundled configs and quality curve; neither it nor the sdist holds tests, tools, docs, examples or data files."""
    pytest.importorskip("build")
    src = tmp_path / "src"
    for f in tracked_files():
        if os.path.islink(os.path.join(ROOT, f)) or not os.path.isfile(os.path.join(ROOT, f)):
            continue  # memwrap/adapters is a link for editable imports; pyproject maps adapters/ itself
        os.makedirs(os.path.dirname(src / f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    expected = package_sources()
    assert {"memwrap/adapters/__init__.py", "memwrap/planning/configs/llama-2-7b.json",
            "memwrap/planning/quality.json"} <= expected
    assert not expected - in_wheel, sorted(expected - in_wheel)
    sdist_expected = {f.replace("memwrap/adapters/", "adapters/", 1) for f in expected}
    assert not sdist_expected - in_sdist, sorted(sdist_expected - in_sdist)
    foreign = ("tests/", "tools/", "docs/", "examples/", ".ci/")
    data = (".safetensors", ".pt", ".png", ".whl", ".gguf")
    for name, names in (("wheel", in_wheel), ("sdist", in_sdist)):
        bad = sorted(n for n in names if n.startswith(foreign) or n.endswith(data))
        assert not bad, (name, bad)


def test_every_file_the_readme_and_docs_link_is_in_git():
    """Relative links and images of README.md and docs/*.md point at files git tracks (so the project page and a
    clone show them), not at files that exist only on one machine."""
    tracked = set(tracked_files())
    folders = {os.path.dirname(f) for f in tracked}
    folders |= {p for f in folders for p in (os.path.dirname(f),)}
    pages = ["README.md"] + [f for f in tracked if f.startswith("docs/") and f.endswith(".md")]
    missing, seen = [], 0
    for page in pages:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            seen += 1
            if path not in tracked and path not in folders:
                missing.append(f"{page} -> {target}")
    assert seen >= 10 and not missing, missing
