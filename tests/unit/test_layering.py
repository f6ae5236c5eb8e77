"""Lower layers never import higher ones: every import in src/baldeagle (module level or inside a
function) is checked against the layers below, so the dependencies go one way."""

import ast
from pathlib import Path

import baldeagle

SRC = Path(baldeagle.__file__).parent
BASE = ("baldeagle.config", "baldeagle.io", "baldeagle.conventions", "baldeagle.errors")  # import only each other
STAGES = ("baldeagle.decode", "baldeagle.train", "baldeagle.export", "baldeagle.export_check", "baldeagle.export_load",
          "baldeagle.serve", "baldeagle.vllm_runner", "baldeagle.quickstart", "baldeagle.cli")
FORBIDDEN = {  # package → what no module in it may import
    "baldeagle.data": STAGES,
    "baldeagle.model": STAGES + ("baldeagle.data", "baldeagle.targets"),
    "baldeagle.targets": STAGES + ("baldeagle.data", "baldeagle.model"),
}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(path: Path) -> set[str]:
    """The baldeagle modules a source file imports (`from baldeagle import x` counts as baldeagle.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "baldeagle" else {node.module}
    return {name for name in found if name.startswith("baldeagle.")}  # bare `baldeagle`: __version__ only


def module_imports() -> dict[str, set[str]]:
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = imports_of(path)
    return modules


def test_no_relative_imports_to_miss():
    for path in SRC.rglob("*.py"):
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(path.read_text()))), path


def test_lower_layers_never_import_higher_ones():
    modules = module_imports()
    assert {"baldeagle.data.generation", "baldeagle.model.draft_config", "baldeagle.conventions"} <= set(modules)
    wrong = []
    for module, imported in modules.items():
        for package, forbidden in FORBIDDEN.items():
            if _under(module, package):
                wrong += [f"{module} imports {name}" for name in imported if any(_under(name, f) for f in forbidden)]
        if module in BASE:
            wrong += [f"{module} imports {name}" for name in imported if name not in BASE]
    assert not wrong, "layering broken:\n" + "\n".join(sorted(wrong))
