"""The package's shape: no import cycles, imports point one way, and files written by release 0.1.0 still load."""

import ast
import json
import os

import pytest
import resume_worker
import torch
from families import CONFIGS, tiny
from test_adapters import tiny_bert
from tiny import tiny_llama, token_batch

import memwrap
from memwrap.adapters import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(__file__), "data", "v0.1.0")


def package_modules() -> dict[str, str]:
    """memwrap.* module name -> file, with adapters/ mapped to memwrap.adapters as pyproject.toml packages it."""
    out = {}
    for folder, package in ((os.path.join(ROOT, "memwrap"), "memwrap"), (os.path.join(ROOT, "adapters"), "memwrap.adapters")):
        for dirpath, dirnames, files in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "adapters" and not d.startswith(("_", "."))]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].replace(os.sep, ".")
                    out[package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"] = \
                        os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (module-level and function-level imports alike)."""
    mods = package_modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        here = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # importing one's own package is no cycle
                    found.add(t)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) >= 30
    assert cycles(graph) == []


def test_imports_point_one_way():
    """api -> planning -> compress; integrations -> api; nothing in compress, optim, planning or adapters imports
    api, integrations, demo or cli, and compress does not import planning."""
    graph = import_graph()
    upper = ("memwrap.api", "memwrap.integrations", "memwrap.demo", "memwrap.cli", "memwrap.trainer")
    wrong = []
    for mod, deps in graph.items():
        if mod.startswith(("memwrap.compress", "memwrap.optim", "memwrap.planning", "memwrap.adapters")):
            wrong += [(mod, d) for d in deps if d.startswith(upper) or d == "memwrap"]
        if mod.startswith("memwrap.compress"):
            wrong += [(mod, d) for d in deps if d.startswith(("memwrap.planning", "memwrap.optim"))]
    assert wrong == []


def test_top_level_holds_at_most_ten_modules_and_the_concepts_are_subpackages():
    top = [f for f in os.listdir(os.path.join(ROOT, "memwrap")) if f.endswith(".py")]
    assert len(top) <= 10, sorted(top)
    for sub in ("compress", "optim", "planning", "integrations", "demo"):
        assert os.path.isfile(os.path.join(ROOT, "memwrap", sub, "__init__.py"))


@pytest.mark.parametrize("family", list(CONFIGS) + ["bert"])
def test_each_adapter_says_where_norms_mlp_and_attention_live(family):
    """parts() finds one MLP per layer, one attention per attention layer and at least two norms per layer."""
    model = tiny_bert() if family == "bert" else tiny(family)
    found = resolve(model).parts(model)
    n_layers = model.config.num_hidden_layers if family != "gpt2" else model.config.n_layer
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * n_layers
    n_attention = sum(t != "linear_attention" for t in layer_types)
    assert (len(found["mlp"]), len(found["attention"])) == (n_layers, n_attention)
    assert len(found["norm"]) >= 2 * n_layers
    assert all("norm" in type(model.get_submodule(n)).__name__.lower() for n in found["norm"])
    for name in found["mlp"] + found["attention"]:
        weights = [p for p in model.get_submodule(name).parameters() if p.ndim >= 2]
        assert len(weights) >= 1  # a real projection lives there


# ---- files written by memwrap 0.1.0 (tests/data/README.md says how they were made) ---------------------------------
def test_plan_written_by_0_1_0_loads_and_round_trips():
    path = os.path.join(DATA, "plan-llama-2-7b-24gb.json")
    plan = memwrap.Plan.load(path)
    with open(path) as f:
        raw = json.load(f)
    got = json.loads(plan.to_json())
    assert {k: got[k] for k in raw} == raw  # every field 0.1.0 wrote reads back unchanged
    assert plan.savings == {"norms": "recompute", "mlp": "act", "attention": "keep", "checkpoint_layers": (),
                            "loss_chunk": 0}
    assert len(plan.layers) == 32 * 7 and plan.budget_bytes == 24 * 10**9


@pytest.mark.parametrize("opt_kind", ["adamw", "memwrap"])
def test_checkpoint_written_by_0_1_0_resumes_bit_exactly(opt_kind, tmp_path):
    """The 0.1.0 checkpoint (step 6 of 12) loads and resumes. Bit-exactness is a property of one process and one
    torch: resumed from it for 6 steps = resumed for 3, saved by this release, loaded into a fresh model and resumed
    for 3 more, bit for bit. Against the losses 0.1.0 recorded (on torch 2.13 CPU) only within a tolerance: another
    torch's kernels may round float32 differently (0.1.0's full run differed by 1e-7 relative on torch 2.14); 1e-4
    leaves room for that rounding carried through 6 steps, and is far below what a wrong state moves these losses
    (resumed without the optimizer state: 6-7% relative, measured)."""
    with open(os.path.join(DATA, "losses.json")) as f:
        recorded = json.load(f)[opt_kind]
    source = os.path.join(DATA, f"checkpoint-{opt_kind}")

    def batch(step):
        return token_batch(seed=100 + step % 3)

    def build(model):
        if not memwrap.compress.inject.is_wrapped(model):
            memwrap.wrap(model, rank=4, granularity=2, refresh_every=4, seed=3)
        if opt_kind == "memwrap":  # ProjFactor, 0.1.0's default (a loaded state brings its kind along anyway)
            return memwrap.optimizer(model, lr=3e-3, weight_decay=0.1, kind="projfactor")
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def resumed_from(path, steps, seed):
        model = tiny_llama(seed=seed)
        memwrap.load(model, path)
        opt = build(model)
        memwrap.load_optimizer(opt, path)
        return model, opt, resume_worker.train(model, opt, steps, batch)

    _, _, straight = resumed_from(source, range(6, 12), seed=7)
    model, opt, first = resumed_from(source, range(6, 9), seed=8)
    memwrap.save(model, tmp_path / "step9", optimizer=opt)
    _, _, second = resumed_from(tmp_path / "step9", range(9, 12), seed=9)
    assert first + second == straight
    assert torch.allclose(torch.tensor(straight), torch.tensor(recorded["losses_6_12"]), rtol=1e-4, atol=0)
