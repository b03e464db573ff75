"""Print constraints.txt: exact versions of kdjax's dependency closure in this environment.

    python launch/freeze_constraints.py > constraints.txt

Walks the requirements of kdjax's base install and of every extra, following each
installed distribution's own requirements, and prints ``name==version`` for every
installed one. Packages not installed where this runs (on the dev machine: those of
the tf, tpu, cuda12 and torch extras) are left unpinned; pip then resolves them
within pyproject.toml's ranges.
"""

from __future__ import annotations

import importlib.metadata as metadata
import pathlib
import re
import sys
import tomllib

from packaging.requirements import Requirement

HEADER = """\
# Exact versions kdjax is tested with (Python 3.11, CPU). One place for the jax version:
# launch/local.sh, launch/tpu_vm.sh, launch/multi_gpu.sh and CI install with
#   pip install -c constraints.txt -e ".[EXTRAS]"
# pyproject.toml holds the ranges a library user gets; this file pins the tested set.
# Regenerate from a tested environment: python launch/freeze_constraints.py > constraints.txt
"""


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def applies(req: Requirement, extras: frozenset[str]) -> bool:
    """True when ``req``'s marker holds for this interpreter and one of ``extras`` (or none)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras or {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of every installed distribution reachable from roots."""
    found: dict[str, str] = {}
    todo = [(req, frozenset()) for req in roots]
    while todo:
        req, parent_extras = todo.pop()
        if not applies(req, parent_extras):
            continue
        name = canonical(req.name)
        if name == "kdjax":
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        key = (name, frozenset(req.extras))
        if key in found:
            continue
        found[key] = dist.version
        extras = frozenset(req.extras)
        todo.extend((Requirement(r), extras) for r in dist.requires or ())
    return {name: version for (name, _), version in found.items()}


def main() -> None:
    project = tomllib.loads(pathlib.Path(__file__).resolve().parents[1]
                            .joinpath("pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    for extra_requirements in project["optional-dependencies"].values():
        roots += [Requirement(r) for r in extra_requirements]
    pins = closure(roots)
    sys.stdout.write(HEADER)
    for name in sorted(pins):
        sys.stdout.write(f"{name}=={pins[name]}\n")


if __name__ == "__main__":
    main()
