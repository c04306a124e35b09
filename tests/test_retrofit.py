"""docs/retrofit.md: every recipe's added lines are in its examples/ script, and every script runs and trains."""

import os
import re
import subprocess
import sys

import pytest
from test_ddp import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "retrofit.md")
SCRIPTS = ("plain", "trainer", "trl", "nanogpt", "accelerate", "ddp", "fsdp2", "deepspeed")


def recipes() -> dict[str, list[str]]:
    """script path -> the code of the '+' lines of its diff in docs/retrofit.md."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    out = {}
    for section in re.split(r"\n## ", text)[1:]:
        script = re.search(r"`(examples/retrofit_\w+\.py)`", section.splitlines()[0])
        diff = re.search(r"```diff\n(.*?)```", section, re.S)
        if script and diff:
            added = [line[1:].split("  #")[0].strip() for line in diff.group(1).splitlines() if line.startswith("+")]
            out[script.group(1)] = [code for code in added if code and not code.startswith("#")]
    return out


def test_every_recipe_diff_is_in_its_script():
    found = recipes()
    assert sorted(found) == sorted(f"examples/retrofit_{s}.py" for s in SCRIPTS)
    for script, lines in found.items():
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            source = f.read()
        assert lines, script
        for code in lines:
            assert code in source, f"{script} lacks the documented line {code!r}"


@pytest.mark.slow
@pytest.mark.parametrize("name,launcher", [("plain", "python"), ("trainer", "torchrun"),
                                           ("trainer --compile", "python"), ("trl", "python"), ("nanogpt", "python"),
                                           ("accelerate", "torchrun"), ("ddp", "torchrun"), ("fsdp2", "torchrun"),
                                           ("deepspeed --stage 3", "deepspeed")])
def test_recipe_script_runs_and_trains(tmp_path, name, launcher):
    """Each recipe once, under the launcher that exercises the most of it (the Trainer and accelerate recipes in one
    process are what tests/test_trainer.py and tests/test_accelerate.py check in detail)."""
    name, *flags = name.split()
    if name == "trl":
        pytest.importorskip("trl")
    script = os.path.join(ROOT, "examples", f"retrofit_{name}.py")
    out = tmp_path / "out"
    if launcher == "torchrun":
        proc = torchrun(script, out)
    elif launcher == "deepspeed":  # Trainer(deepspeed=ZeRO-3 config), 2 ranks; the script checks resume and export
        pytest.importorskip("deepspeed")
        from test_deepspeed import launch

        proc = launch(script, *flags, str(out))
    else:  # compiled runs use AOTAutograd without code generation here: the graph, not the C++ compiler, is tested
        env = dict(os.environ, OMP_NUM_THREADS="1", MEMWRAP_COMPILE_BACKEND="aot_eager")
        args = [str(out)] if name in ("plain", "trainer", "trl", "accelerate") else []
        proc = subprocess.run([sys.executable, script, *flags, *args], capture_output=True, text=True, timeout=240,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+", proc.stdout), proc.stdout
