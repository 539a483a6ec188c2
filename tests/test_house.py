"""The package's files are its architecture: README's Layout table lists every module once,
bottom up, and each imports (at the top or inside a function) only modules above it: every
arrow points down, and there is no circle."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradcam_tut"


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in it, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found |= {n.split(".")[0] for n in names}
    return found


def layout_table() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    return re.findall(r"^\| `(\w+)\.py` \|", section, flags=re.M)


def test_readme_lists_every_module_once():
    table = layout_table()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(table) == modules and len(set(table)) == len(table)


def test_every_import_points_down_the_table():
    order = layout_table()
    for i, module in enumerate(order):
        above = set(order[:i])
        assert imports(module) <= above, (module, imports(module) - above)
