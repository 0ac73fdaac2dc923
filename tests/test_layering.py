"""The import rules of docs/architecture.md: a floor of the package never imports a floor above it.

Every module's imports are read with `ast` (also those inside functions), relative ones resolved, so a lazy
import breaks the rules as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mistralrs

PACKAGE_DIR = Path(mistralrs.__file__).parent
LOWER_FLOORS = ("core", "worker", "models", "layers", "sample", "quant", "adapters", "vision", "diffusion",
                "distributed")
# floor -> the floors (first package below mistralrs) it must not import
FORBIDDEN = {
    "formats": {*LOWER_FLOORS, "loader", "engine", "api", "server", "cli"},  # file formats: the bottom floor
    **{floor: {"loader", "engine", "api", "server", "cli"} for floor in LOWER_FLOORS},
    "loader": {"engine", "api", "server", "cli"},
    "engine": {"server", "cli"},
    "api": {"server", "cli"},
}
# api modules the engine may import: the request/response data types it assembles
ENGINE_API_MODULES = {"mistralrs.api.requests", "mistralrs.api.responses", "mistralrs.api.enums"}


def _module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, package_dir: Path) -> bool:
    path = package_dir.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, module: str, package_dir: Path) -> set[str]:
    """The absolute names of the package's modules that `path` (module `module`) imports: for `from x import y`,
    x.y when it is a module, else x."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full, package_dir) else base)
    return {name for name in found if name == "mistralrs" or name.startswith("mistralrs.")}


def _floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """`module imports target` for every import that breaks FORBIDDEN or ENGINE_API_MODULES."""
    violations = []
    for path in sorted(package_dir.rglob("*.py")):
        module = _module_name(path, package_dir)
        floor = _floor(module)
        for target in sorted(imported_modules(path, module, package_dir)):
            target_floor = _floor(target)
            if target_floor is None or target_floor == floor:
                continue
            engine_reads_api = floor == "engine" and target_floor == "api"
            if target_floor in FORBIDDEN.get(floor, set()) or (engine_reads_api and target not in ENGINE_API_MODULES):
                violations.append(f"{module} imports {target}")
    return violations


def test_no_floor_imports_a_floor_above_it():
    assert layering_violations() == []


def test_the_rules_catch_a_loader_importing_the_api(tmp_path):
    package = tmp_path / "mistralrs"
    for folder, source in [("api", ""), ("loader", "from mistralrs.api.which import Which\n"),
                           ("engine", "from mistralrs.api.requests import CompletionRequest\n"
                                      "from ..api import runner\n"),
                           ("models", "def f():\n    from ..engine import llm_engine\n")]:
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
        (package / folder / "m.py").write_text(source)
    for module in ("api/which.py", "api/requests.py", "api/runner.py", "engine/llm_engine.py"):
        (package / module).write_text("")
    assert layering_violations(package) == [
        "mistralrs.engine.m imports mistralrs.api.runner", "mistralrs.loader.m imports mistralrs.api.which",
        "mistralrs.models.m imports mistralrs.engine.llm_engine"]
