"""The code a notebook writes in front of the reader, to compare with the package's."""

import ast
import json
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def definitions(source: str) -> dict[str, str]:
    """Each top-level class and function in `source`, as an AST dump without docstrings."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            for fn in [node, *ast.walk(node)]:  # drop docstrings
                body = getattr(fn, "body", None)
                if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                        and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    fn.body = body[1:] or [ast.Pass()]
            found[node.name] = ast.dump(node)
    return found


def notebook_definitions(name: str) -> dict[str, str]:
    """`definitions` of every code cell of notebooks/`name`."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    return definitions("\n".join("".join(c["source"]) for c in nb["cells"]
                                 if c["cell_type"] == "code"))
