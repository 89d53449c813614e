"""Print birdgen's pinned requirements from pyproject.toml, one per line, for the Dockerfiles.

Why: pyproject.toml is the one place versions are written; the images install from this list (the
dependency layer is then cached until pyproject.toml changes) instead of repeating any version.

    python3 docker/pins.py serve                # base dependencies + the serve extra
    python3 docker/pins.py serve --only torch   # just torch's pin (installed from a CUDA wheel index)
    python3 docker/pins.py serve --without torch

Self-references such as "birdgen[serve]" inside an extra are expanded. Standard library only: it runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"unreadable requirement {requirement!r} in pyproject.toml")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(extras: Sequence[str], pyproject: Path = PYPROJECT) -> list[str]:
    """Base dependencies plus those of `extras` (recursively through "<project>[extra]"), in order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    own = _name(project["name"])
    out: list[str] = []
    seen: set[str] = set()

    def add(items: Sequence[str]) -> None:
        for item in items:
            match = _NAME.match(item)
            if match is not None and _name(item) == own:
                for extra in (match.group(3) or "").split(","):
                    visit(extra.strip())
            elif item not in out:
                out.append(item)

    def visit(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r}; it has: {', '.join(optional)}")
        seen.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        visit(extra)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras of pyproject.toml to include")
    parser.add_argument("--only", action="append", default=[], help="print just these packages")
    parser.add_argument("--without", action="append", default=[], help="leave these packages out")
    args = parser.parse_args(argv)
    only = {_name(n) for n in args.only}
    without = {_name(n) for n in args.without}
    chosen = [
        r for r in requirements(args.extras) if (not only or _name(r) in only) and _name(r) not in without
    ]
    missing = only - {_name(r) for r in chosen}
    if missing:
        print(f"pins.py: not pinned in {args.extras}: {', '.join(sorted(missing))}", file=sys.stderr)
        return 2
    print("\n".join(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
