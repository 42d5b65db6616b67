"""The layers import downward only, with no exceptions list (every import counts, function-level ones too).

- ``shared/`` imports nothing of the project above it.
- ``serving/`` never imports ``training/`` or ``cluster/``; ``training/`` never imports
  ``serving/`` or ``cluster/``. ``cluster/`` sits on top.
- A stage folder of ``training/`` (``training/<stage>/``) imports only ``shared/``, the
  ``training/`` root modules and its own stage; the root modules import no stage.
- No circle of imports, and no module over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "training", "serving", "cluster")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every project module."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (``from pkg import submodule`` resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return {m for m in found if m.split(".")[0] in PACKAGES and m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


STAGES = sorted(p.name for p in (ROOT / "training").iterdir() if (p / "__init__.py").exists())


def room(name: str) -> str:
    """``shared``, ``serving``, ``cluster``, ``training`` (the root) or ``training/<stage>``."""
    parts = name.split(".")
    if parts[0] == "training" and len(parts) > 1 and parts[1] in STAGES:
        return f"training/{parts[1]}"
    return parts[0]


def allowed(src: str, dst: str) -> bool:
    a, b = room(src), room(dst)
    if a == "cluster" or a == b:
        return True
    if a == "shared":
        return False
    if a == "serving":
        return b == "shared"
    if a == "training":
        return b == "shared"
    return b in ("shared", "training")  # a stage: shared, the training root, itself


def test_training_has_stage_folders():
    assert STAGES == ["adapt", "capture", "data", "evaluate", "fit", "label"]


def test_every_import_goes_downward():
    bad = [f"{src} -> {dst}" for src, dsts in graph().items() for dst in sorted(dsts) if not allowed(src, dst)]
    assert not bad, "imports that break the layer rule:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("pkg", PACKAGES + ("tests", "bench"))
def test_no_module_over_400_lines(pkg):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_rule_catches_what_it_should():
    assert not allowed("shared.artifact", "training.loop")
    assert not allowed("serving.app", "training.dataset") and not allowed("training.dataset", "serving.config")
    assert not allowed("training.fit.tune", "training.evaluate.baselines")
    assert not allowed("training.metrics", "training.fit.run")
    assert allowed("training.fit.tune", "training.embedder") and allowed("cluster.demo", "serving.app")
