"""Which installed packages differ from the lock (requirements/lock.txt).

`make test` and `make test-latest` print this before the suite: a log then says what it tested, and a failure
under test-latest comes with the releases that caused it.
"""
from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
# the packages whose versions a reader of a test log wants first
HEADLINE = ("torch", "transformers", "accelerate", "safetensors", "gguf", "gradio", "lm-eval", "datasets",
            "numpy", "llama-cpp-python")


@dataclass(frozen=True)
class Drift:
    name: str
    locked: str
    installed: str | None  # None: not installed


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of every ``name==version`` line."""
    pins = {}
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if "==" in text:
            name, version = (part.strip() for part in text.split("==", 1))
            pins[canonicalize_name(name)] = version
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def same_release(locked: str, installed: str) -> bool:
    """The lock drops torch's local label ("+cpu"), so compare public versions."""
    return Version(locked).public == Version(installed).public


def drift(path: Path = LOCK) -> list[Drift]:
    """Locked packages whose installed version differs (installed ones only; a missing optional one, such as
    llama-cpp-python before `make llama-cpp`, is not drift)."""
    result = []
    for name, locked in sorted(read_lock(path).items()):
        installed = installed_version(name)
        if installed is not None and not same_release(locked, installed):
            result.append(Drift(name, locked, installed))
    return result


def headline() -> str:
    """"torch 2.13.0+cpu, transformers 5.25.0, ..." for the installed headline packages."""
    found = ((name, installed_version(name)) for name in HEADLINE)
    return ", ".join(f"{name} {version}" for name, version in found if version)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else LOCK
    differences = drift(path)
    print(f"installed: {headline()}")
    if not differences:
        print(f"every installed package matches {path}")
        return 0
    print(f"{len(differences)} installed packages differ from {path}:")
    width = max(len(d.name) for d in differences)
    for d in differences:
        print(f"  {d.name:<{width}}  locked {d.locked:<12} installed {d.installed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
