"""The package's folders are its layers: a module imports only from its own layer or the layers below it.

Read with ``ast`` (imports inside functions count too), so a new import that breaks the architecture in
docs/architecture.md fails here, with the offending module and import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "perceptual_diffusion"
# Bottom to top. `data` needs no model code, so it sits beside `core`/`models` but is listed after them.
LAYERS = (
    "errors",
    "config",
    "runtime",
    "core",
    "models",
    "data",
    "training",
    "evaluation",
    "experiments",
    "testing",
    "cli",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every `from X import ...` / `import X` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports (found a relative one at line {node.lineno})"
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_sits_in_a_known_layer() -> None:
    layers = {_layer(m) for m in _modules()}
    assert layers - {"__init__", "__main__"} <= set(LAYERS), layers - set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        mine = _layer(module)
        for target, names in _imports(path):
            if not target.startswith("perceptual_diffusion"):
                continue
            # `from perceptual_diffusion.core import networks` imports the module core.networks.
            targets = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            for t in targets:
                theirs = _layer(t)
                if theirs in rank and mine in rank and rank[theirs] > rank[mine]:
                    wrong.append(f"{module} imports {t}")
    assert not wrong, wrong


def test_no_private_name_is_imported_across_modules() -> None:
    wrong = [
        f"{module} imports {target}.{n}"
        for module, path in _modules().items()
        for target, names in _imports(path)
        if target.startswith("perceptual_diffusion")
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert not wrong, wrong


def test_module_level_imports_have_no_cycle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports may not form a cycle here
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("perceptual_diffusion"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
        graph[module] = deps & modules.keys() - {module}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
