"""Print the project's requirements with every tested upper bound lifted to the next major release.

`make test-latest` installs what this prints, so the suite meets the newest releases upstream has published,
not only the ones `pyproject.toml` already admits: a package that breaks us shows up here before a user
installs it. When the suite passes, raise that package's bound in `pyproject.toml` and refresh the lock
(`make lock`); when it fails, fix the code first (README "Installs and versions").

``--hold NAME==VERSION`` keeps a package at one version (torch: a newer torch on this disk is a CUDA build
of several GB, so its drift is checked by bumping the lock's torch on purpose).
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import Specifier, SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lifted_bound(spec: Specifier) -> Specifier:
    """A tested bound (``<5.26``, ``<0.4.14``) becomes the next major (``<6``, ``<1``): a probe, not a promise.
    A bound that is already a major (``<3``) stays: it marks an API break we have not ported to."""
    version = Version(spec.version)
    if spec.operator == "<" and len(version.release) == 1:
        return spec
    return Specifier(f"<{version.major + 1}")


def widened(requirement: Requirement) -> Requirement:
    """The requirement with its upper bounds lifted (``lifted_bound``) and its extras dropped."""
    specifiers = [lifted_bound(s) if s.operator in ("<", "<=") else s for s in requirement.specifier]
    result = Requirement(str(requirement))
    result.specifier = SpecifierSet(",".join(str(s) for s in specifiers))
    result.extras = set()
    return result


def project_requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    texts = list(project["dependencies"]) + [r for extra in extras for r in optional[extra]]
    return [Requirement(t) for t in texts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="test,gui,eval,hub", help="comma-separated extras of pyproject.toml")
    parser.add_argument("--hold", action="append", default=[], metavar="NAME==VERSION",
                        help="keep this package at exactly this version (repeatable)")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    held = {Requirement(h).name.lower(): Requirement(h) for h in args.hold}
    for requirement in project_requirements(args.pyproject, [e for e in args.extras.split(",") if e]):
        line = held.pop(requirement.name.lower(), None) or widened(requirement)
        print(line)
    for requirement in held.values():  # held packages the project does not name directly
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
