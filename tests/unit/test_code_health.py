"""Code health: every function in src/baldeagle stays short enough to read as one unit."""

import ast
from pathlib import Path

MAX_FUNCTION_LINES = 60
SOURCE = Path(__file__).resolve().parents[2] / "src" / "baldeagle"  # this checkout's, whatever is installed


def long_functions(root: Path, limit: int) -> list[str]:
    """'path:line name (N lines)' for every function or method whose lines, from `def` to its last
    line (signature, docstring and body, nested functions included), number more than `limit`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_src_is_longer_than_60_lines():
    assert SOURCE.name == "baldeagle" and len(list(SOURCE.rglob("*.py"))) > 20  # the real package, all of it
    offenders = long_functions(SOURCE, MAX_FUNCTION_LINES)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines; split them into named steps: " + ", ".join(offenders)


def test_the_length_check_names_an_offender(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(61))
    (package / "mod.py").write_text(f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}\n")
    assert long_functions(package, MAX_FUNCTION_LINES) == ["pkg/mod.py:6 long (62 lines)"]
