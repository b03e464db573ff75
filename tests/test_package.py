"""The package as a user installs it: a light base install, extras, pins, the `kdjax` command."""

import ast
import importlib
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The pure core a JAX user imports with the base install, and what it may import.
CORE_MODULES = ("kdjax.losses", "kdjax.controllers", "kdjax.evolution")
BASE_IMPORTS = {"jax", "optax", "numpy"}
# Distributions the training stack brings; none may arrive with the base install.
TRAIN_ONLY = ("flax", "orbax", "grain", "tensorflow_datasets", "tensorflow", "ml_collections",
              "matplotlib", "clu", "chex")


def module_file(name: str) -> pathlib.Path:
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            # `from kdjax import losses` imports the submodule kdjax.losses.
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}").exists()}
    return names


def test_core_imports_only_base_dependencies():
    """Cheap, always-run form of the light-install check: follow the core's imports in the source."""
    seen, todo, third_party = set(), list(CORE_MODULES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imported_modules(module_file(name)):
            top = imported.split(".")[0]
            if top == "kdjax":
                if module_file(imported).exists():
                    todo.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    assert third_party <= BASE_IMPORTS, f"core imports {third_party - BASE_IMPORTS}"
    base = {Requirement(r).name for r in PROJECT["dependencies"]}
    assert base == BASE_IMPORTS  # the distributions have the modules' names


def pyproject_requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("kdjax")]
    return reqs


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_a_range_and_its_pin_lies_inside():
    pins = constraints()
    assert pins["jax"] == pins["jaxlib"]
    for req in pyproject_requirements():
        specs = {spec.operator for spec in req.specifier}
        assert {">=", "<"} <= specs, f"{req} needs a lower and an upper bound"
        pinned = pins.get(canonical(req.name))
        if pinned is not None:  # the tf/tpu/cuda12/torch extras are not installed where we test
            assert Version(pinned) in req.specifier, f"constraints.txt {req.name}=={pinned} outside {req}"


def test_installers_use_the_constraints_file_and_name_no_jax_version():
    """One place for the jax version: every installer goes through constraints.txt."""
    installers = [REPO / ".ci/run", *sorted((REPO / "launch").glob("*.sh"))]
    for script in installers:
        text = script.read_text()
        assert not re.search(r"jax[^\s'\"]*==", text), f"{script.name} pins jax itself"
        if "pip install" in text:
            assert re.search(r"-c \S*constraints.txt", text), script.name


def test_console_entry_point_and_type_marker():
    module, function = PROJECT["scripts"]["kdjax"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert (REPO / "kdjax/py.typed").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_base_install_is_light(tmp_path):
    """pip-installs kdjax WITHOUT extras into a fresh venv (needs the package index; ~30 s
    with a warm pip cache) and imports the pure core there with no training stack present."""
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                    str(source)], check=True, cwd=tmp_path, timeout=840)
    probe = (
        "import importlib.util, kdjax.losses, kdjax.controllers, kdjax.evolution, pathlib, kdjax\n"
        f"print(sorted(m for m in {TRAIN_ONLY!r} if importlib.util.find_spec(m)))\n"
        "print(pathlib.Path(kdjax.__file__).with_name('py.typed').exists())\n"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout.splitlines()
    assert out == ["[]", "True"], out
    assert (venv / "bin" / "kdjax").exists()


def repository_texts():
    """(path, text) of the repository's own Python, Markdown and shell files."""
    skip = {".git", ".venv", "build", ".pytest_cache"}
    for path in REPO.rglob("*"):
        if path.suffix in (".py", ".md", ".sh") and not skip & set(path.relative_to(REPO).parts):
            yield path, path.read_text()


def test_docs_travel_with_the_repository():
    """No file cites the lead's notes outside the repository; every docs/ page cited exists,
    and the links between docs pages resolve."""
    for path, text in repository_texts():
        assert not re.search(r"PAPERS\.md|DESIGN\.md|\.\./shared", text), path
        for page in re.findall(r"docs/[A-Za-z_]+\.md", text):
            assert (REPO / page).exists(), f"{path} cites missing {page}"
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
