"""Print pyproject.toml's runtime dependencies pinned to their floors (``name==lowest``): a pip constraints
file with which .ci/run installs latentgraph at the lowest versions we declare, to prove them."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

for line in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]:
    requirement = Requirement(line)
    floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    if len(floors) != 1:
        sys.exit(f"pyproject.toml: {line!r} needs exactly one floor (>=) for the lowest-versions CI job")
    print(f"{requirement.name}=={floors[0]}")
