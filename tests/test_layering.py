"""The package's layering: models sit below pruning, train and the pipelines."""

import ast
import pathlib

import kdjax

UPWARD = ("kdjax.pruning", "kdjax.pipelines", "kdjax.train")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every absolute module name a file imports (``import a.b``, ``from a.b import c``
    gives both ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def upward(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == u or n.startswith(u + ".") for u in UPWARD))


def test_imported_modules_sees_both_import_forms(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import kdjax.train.loop\nfrom kdjax import pruning\n"
                      "from kdjax.pipelines.common import setup\n")
    assert upward(imported_modules(source)) == [
        "kdjax.pipelines.common", "kdjax.pipelines.common.setup", "kdjax.pruning",
        "kdjax.train.loop"]


def test_models_import_nothing_above_them():
    root = pathlib.Path(kdjax.__file__).parent / "models"
    files = sorted(root.rglob("*.py"))
    assert files
    offenders = {f.name: upward(imported_modules(f)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_reports_imports_matplotlib():
    root = pathlib.Path(kdjax.__file__).parent
    users = sorted(str(f.relative_to(root)) for f in root.rglob("*.py")
                   if any(n == "matplotlib" or n.startswith("matplotlib.")
                          for n in imported_modules(f)))
    assert users == ["reports.py"]
