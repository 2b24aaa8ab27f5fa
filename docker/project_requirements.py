"""Print the project's requirements and those of the given extras, one a line, read from pyproject.toml alone.

The Dockerfiles install these before they copy the code, so that a change to the code rebuilds only the
last layers: `python project_requirements.py pyproject.toml worker > requirements.txt`.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"{pyproject} has no extra {', '.join(unknown)} (it has {', '.join(optional)})")
    return [*project["dependencies"], *(requirement for extra in extras for requirement in optional[extra])]


if __name__ == "__main__":
    print("\n".join(project_requirements(Path(sys.argv[1]), sys.argv[2:])))
