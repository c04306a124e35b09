"""`import memwrap.adapters` works after `pip install .` and after `pip install -e .` (adapters/ is mapped)."""

import os
import shutil
import subprocess
import sys
import venv

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
