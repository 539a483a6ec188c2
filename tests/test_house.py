"""The package's files are its architecture: README's Layout section lists every module once,
the lesson's library (`gradcam_tut/`) bottom up, then the tool (`gradcam_tut/tool/`) bottom up,
and each module imports (at the top or inside a function) only modules above it: every arrow
points down, and there is no circle. The lesson imports nothing of the tool, and no function
shadows its module (`from gradcam_tut.tool import explaining` never meets a function `explaining`).
"""

import ast
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import gradcam_tut

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradcam_tut"
TOOL = "tool"  # the tool's subpackage: its modules are named "tool/<module>" here, as in README


@cache
def module_files() -> dict[str, Path]:
    """Every module of both packages, by its name in README's tables ("cam", "tool/cli")."""
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    files |= {f"{TOOL}/{p.stem}": p for p in (PACKAGE / TOOL).glob("*.py")
              if p.stem != "__init__"}
    return files


@cache  # each file parsed once for all the tests below
def imported(file: Path) -> frozenset[str]:
    """The package's modules that `file` imports anywhere in it, lazy imports included, by their
    name in README's tables; a subpackage imported whole is named by its folder ("tool/")."""
    package = ["gradcam_tut", *file.relative_to(PACKAGE).parent.parts]  # where `.` points
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = [*base, *(node.module.split(".") if node.module else [])]
            targets = [[*stem, a.name] for a in node.names] + ([stem] if node.module else [])
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in targets:
            if parts[:1] != ["gradcam_tut"] or len(parts) < 2:
                continue
            name = "/".join(parts[1:3]) if parts[1] == TOOL else parts[1]
            if name == TOOL:
                found.add(f"{TOOL}/")
            elif name in module_files():
                found.add(name)
    return frozenset(found)


def layout_rows() -> list[str]:
    """The modules README's Layout section lists, in its order ("cam", "tool/cli")."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    end = section.find("\n## ", 1)
    return re.findall(r"^\| `((?:tool/)?\w+)\.py` \|", section if end < 0 else section[:end],
                      flags=re.M)


def layout_tables() -> tuple[list[str], list[str]]:
    """README's Layout tables: the lesson's modules, then the tool's, each bottom up."""
    rows = layout_rows()
    return ([r for r in rows if not r.startswith(f"{TOOL}/")],
            [r for r in rows if r.startswith(f"{TOOL}/")])


def test_readme_lists_every_module_once_the_lesson_first():
    lesson, tool = layout_tables()
    assert layout_rows() == lesson + tool  # the lesson's table, then the tool's
    table = lesson + tool
    assert sorted(table) == sorted(module_files()) and len(set(table)) == len(table)


def test_every_import_points_down_the_table():
    lesson, tool = layout_tables()
    order = lesson + tool  # the tool sits on the whole lesson
    files = module_files()
    for i, module in enumerate(order):
        above = set(order[:i])
        assert imported(files[module]) <= above, (module, imported(files[module]) - above)


def test_the_lesson_imports_nothing_of_the_tool():
    """Lazy imports included, and the names `gradcam_tut` hands out on first use."""
    lesson, _ = layout_tables()
    files = module_files()
    for module in [*lesson, "__init__"]:
        file = files.get(module, PACKAGE / f"{module}.py")
        assert not {m for m in imported(file) if m.startswith(TOOL)}, module
    assert set(gradcam_tut._WHERE.values()) <= set(lesson)


def test_no_function_shadows_its_module():
    """`from gradcam_tut.tool import auditing` then `auditing.audit(...)`: never a module and a
    function of one name, which forces an alias on whoever imports both."""
    files = {**module_files(), TOOL: PACKAGE / TOOL / "__init__.py"}
    for module, file in files.items():
        functions = {node.name for node in ast.parse(file.read_text()).body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and not node.name.startswith("_")}
        assert module.split("/")[-1] not in functions, module


def test_the_tests_check_themselves():
    """`imported` sees each kind of import: relative, up a level, absolute, lazy, whole package."""
    files = module_files()
    assert imported(files["learner"]) >= {"cam", "plot", "images"}
    assert imported(files["tool/auditing"]) >= {"cam", "tool/explaining", "tool/results"}
    assert "tool/mini_fish" in imported(files["tool/cli"])  # `from . import mini_fish`, lazy
    assert imported(files["tool/runner"]) == {"tool/settings"}  # inside functions only


LIGHT = """
import sys, torch
from hooks import HookBwd, HookForward
m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True))
with HookBwd(m[0]) as g, HookForward(m[0]) as f:
    m(torch.randn(1, 3, 8, 8)).sum().backward()
assert f.stored.shape == g.stored.shape == (1, 4, 6, 6), 'hooks'
assert not [k for k in sys.modules if k.startswith(('gradcam_tut', 'fastai'))], 'hooks'
import gradcam_tut.metrics
assert not {'fastai', 'matplotlib', 'pandas'} & set(sys.modules), 'metrics'
import gradcam_tut.plot
assert 'fastai' not in sys.modules, 'plot'
print('ok')
"""


def test_the_light_files_load_only_what_they_need(tmp_path):
    """One fresh interpreter, one step after another (torch, slow to import, imported once):
    hooks.py copied alone works on torch alone (README's "Copy the hooks"); then metrics
    loads no fastai, matplotlib or pandas; then plot no fastai."""
    shutil.copy(PACKAGE / "hooks.py", tmp_path / "hooks.py")
    out = subprocess.run([sys.executable, "-c", LIGHT], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
