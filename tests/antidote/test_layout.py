"""The package's shape: no import cycle among the antidote modules (lazy imports inside functions count), no
module importing another module's private helper, and the method registry is read-only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import robustlab.antidote

ROOT = Path(robustlab.antidote.__file__).parent
PACKAGE = "robustlab.antidote"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Every ``from robustlab.antidote... import ...`` / ``import robustlab.antidote...`` of every module,
    at any depth of the file: ``{module: [(imported module, names), ...]}``."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        me = module_name(path)
        out = found.setdefault(me, [])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                names = [a.name for a in node.names]
                # "from robustlab.antidote import judges" imports the module robustlab.antidote.judges
                subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
                out += [(s, []) for s in subs] or [(node.module, names)]
            elif isinstance(node, ast.Import):
                out += [(a.name, []) for a in node.names if a.name.startswith(PACKAGE)]
    return found


def test_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in deps if t != m and t != PACKAGE} for m, deps in imports().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_no_module_imports_another_modules_private_helper():
    bad = [
        f"{me} imports {name} from {target}"
        for me, deps in imports().items()
        for target, names in deps
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, bad


def test_method_registry_is_read_only_and_each_stage_has_its_methods():
    from robustlab.antidote import methods as M

    with pytest.raises(TypeError):
        M.REGISTRY["mine"] = M.REGISTRY["sft"]  # type: ignore[index]
    assert M.names("alignment") == ("sft", "vaccine", "repnoise", "booster")
    assert M.names("finetune") == ("sft", "lisa", "ldifs")
    assert M.names("post") == ("none", "antidote", "random", "magnitude", "safelora", "resta")
    for name in (*M.names("alignment"), *M.names("finetune")):
        assert callable(M.train_function(name))
