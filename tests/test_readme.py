"""The README's promises: its python blocks run as written, CI runs its test command, every
file:name its equation-to-code tables point at exists, and the project's imports run one way."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SOURCES = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def test_readme_opens_with_exactly_two_setup_commands():
    quick = README.split("\n## ", 2)[1]                      # the first section
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", quick, flags=re.S)
    lines = [l for block in commands for l in block.strip().splitlines()]
    assert len(lines) == 2, lines
    assert all(l.startswith("pip install -r requirements.txt && ") for l in lines)
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert lines[1] in ci, "`.ci/run` must call the README's test command verbatim"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})


def _defined(path):
    """Names a file defines at module level, and Class.method for its classes' functions."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


REFS = sorted(set(re.findall(r"`(\w+\.py):([\w.]+)`", README)))


def test_readme_has_code_map():
    assert len(REFS) >= 15, REFS


@pytest.mark.parametrize("ref", REFS, ids=[f"{f}:{n}" for f, n in REFS])
def test_readme_code_map_points_at_real_code(ref):
    path, name = ref
    assert os.path.exists(os.path.join(ROOT, path)), f"README names {path}, which does not exist"
    assert name in _defined(os.path.join(ROOT, path)), f"README points at {path}:{name}, not defined there"


def _imports(path, own):
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            deps |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            deps.add(node.module.split(".")[0])
    return deps & own


def find_cycle(graph):
    """A list of modules forming an import cycle in {module: set of imported modules}, or None."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d, stack + [d])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_find_cycle_on_hand_cases():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_project_imports_run_one_way():
    own = {f[:-3] for f in SOURCES}
    graph = {f[:-3]: _imports(os.path.join(ROOT, f), own) - {f[:-3]} for f in SOURCES}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    for model in ("moe_adapter", "soft_moa", "encoder", "llm"):    # copyable alone
        assert graph[model] <= {"soft_moa"}, f"{model}.py imports {graph[model]}"
    for leaf in ("train", "eval", "train_moa", "eval_moa"):
        users = [m for m, d in graph.items() if leaf in d and m not in ("eval", "eval_moa")]
        assert not users, f"{users} import {leaf}.py"
