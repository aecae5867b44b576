"""The package's shape: a small lazy public surface, modules of one concept, no import cycles, and nothing
imported from the package root inside the package."""

import ast
import subprocess
import sys
from pathlib import Path

import latentgraph as lg

PACKAGE = Path(lg.__file__).parent


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports, at any depth of its code (function-level imports count; those
    made for type checkers only do not)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    guards = [block for block in ast.walk(tree)
              if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)]
    typing_only = {id(n) for block in guards for statement in block.body for n in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = {f"{target}.{alias.name}" for alias in node.names}
            found |= names if node.module is None else {target, *names}  # "from . import x" imports x
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentgraph"):
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_import_is_lazy_and_the_surface_small():
    code = "import sys, latentgraph; print(sorted(m for m in ('torch', 'transformers', 'rich') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert len(lg.__all__) <= 16 and len(set(lg.__all__)) == len(lg.__all__)
    assert all(getattr(lg, name) is not None for name in lg.__all__)
    assert set(lg.__all__) <= set(dir(lg))


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := path.read_text().count("\n")) > 400}
    assert long == {}


def test_no_two_modules_import_each_other_and_none_imports_the_package_root():
    found = modules()
    edges = {name: {t for t in imports(name, path) if t in found and t != name} for name, path in found.items()}
    from_root = sorted(name for name, targets in edges.items() if "latentgraph" in targets and name != "latentgraph")
    assert from_root == []
    cycles = sorted((a, b) for a, targets in edges.items() for b in targets if a < b and a in edges.get(b, ()))
    assert cycles == []


def test_every_raised_error_is_a_latentgraph_error():
    """``raise X(...)`` in the package names only LatentGraphError subclasses (or re-raises)."""
    allowed = {name for name in dir(lg.errors) if isinstance(getattr(lg.errors, name), type)
               and issubclass(getattr(lg.errors, name), lg.LatentGraphError)}
    allowed |= {"AttributeError", "SystemExit", "error", "_error"}  # protocols; error classes passed in by callers
    # raised and converted within the package before a user sees them: (module, exception)
    internal = {("latentgraph.core.config", "ValueError"), ("latentgraph.core.config", "PydanticCustomError"),
                ("latentgraph.core.links", "ValueError"), ("latentgraph.core.conditions", "ValueError"),
                ("latentgraph.core.conditions", "PydanticCustomError"),
                ("latentgraph.core.config_base", "PydanticCustomError"), ("latentgraph.training.data", "KeyError"),
                ("latentgraph.files.atomic", "OSError"), ("latentgraph.tools.cgroups", "OSError"),
                ("latentgraph.files.text", "NotJSON")}
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id not in allowed and (name, node.exc.func.id) not in internal:
                    offenders.append(f"{name}:{node.lineno} raises {node.exc.func.id}")
    assert offenders == []
