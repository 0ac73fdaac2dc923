"""Third-party packages, imported so that a file of the user's cannot stand in for them.

Python puts the running script's folder first on `sys.path` (the current folder for `python -c`, `-m` and the
REPL), so a file there named like a package is imported in the package's place: the reference's own examples
include `llguidance.py`, `gguf.py`, `regex.py` and `lark.py`, side by side. `import_dependency(name)` therefore:

- finds the module without running it; when it lies in that first folder and an installed package of the same
  name lies further along `sys.path`, imports the installed one (a warning names the file passed over);
- fails with an ImportError naming the file when the module found (or one imported earlier) is not the package:
  it lacks the attribute the package always defines, or it lies in the first folder with no installed package
  behind it.

`import mistralrs` imports the packages every model needs (`CORE_DEPENDENCIES`) this way; the others are
imported at first use (jinja2 when a chat template is compiled, llguidance when a grammar is, PyYAML when a
topology file is read). GGUF files are read without the `gguf` package (mistralrs/formats/gguf_format.py).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dependency:
    """A third-party package mistralrs imports, and how to tell it from a file that only shares its name."""

    name: str  # top-level import name
    marker: str  # an attribute the real package always defines
    needed_for: str  # what mistralrs uses it for (said in errors)


DEPENDENCIES: dict[str, Dependency] = {dep.name: dep for dep in (
    Dependency("torch", "Tensor", "every model"),
    Dependency("numpy", "ndarray", "reading model files"),
    Dependency("safetensors", "safe_open", "reading safetensors checkpoints"),
    Dependency("tokenizers", "Tokenizer", "tokenizing"),
    Dependency("jinja2", "Environment", "chat templates"),
    Dependency("llguidance", "LLMatcher", "grammar-constrained generation"),
    Dependency("yaml", "safe_load", "topology files"),
)}
CORE_DEPENDENCIES = ("torch", "numpy", "safetensors", "tokenizers")  # imported by `import mistralrs`


def import_dependency(name: str) -> ModuleType:
    """The installed package `name` (a key of DEPENDENCIES), never a same-named file of the user's.

    Raises ImportError naming the file that stands in for the package when the package cannot be had.
    """
    dep = DEPENDENCIES[name]
    module = sys.modules.get(name)
    if module is None:
        module = _import_past_first_folder(dep)
    if not hasattr(module, dep.marker):
        raise ImportError(f"mistralrs needs the {name} package for {dep.needed_for}, but `import {name}` gives "
                          f"{_location(module)}, which is not it (no {name}.{dep.marker}); rename that file")
    return module


def import_core_dependencies() -> None:
    """Import the packages every model needs (run by `import mistralrs` before anything else)."""
    for name in CORE_DEPENDENCIES:
        import_dependency(name)


def _first_folder() -> str | None:
    """The folder Python put first on sys.path for the script, or the current folder; None under `-P`."""
    if sys.flags.safe_path or not sys.path:
        return None
    return os.path.realpath(sys.path[0] or os.curdir)


def _spec_folder(spec: importlib.machinery.ModuleSpec) -> str | None:
    """The sys.path folder a module was found in (the parent of a package's folder)."""
    if spec.submodule_search_locations:
        return os.path.dirname(os.path.realpath(next(iter(spec.submodule_search_locations))))
    if spec.origin and spec.has_location:
        return os.path.dirname(os.path.realpath(spec.origin))
    return None


def _import_past_first_folder(dep: Dependency) -> ModuleType:
    spec = importlib.util.find_spec(dep.name)  # finds without running the module
    first = _first_folder()
    if spec is None or first is None or _spec_folder(spec) != first:
        return importlib.import_module(dep.name)
    rest = [entry for entry in sys.path[1:] if os.path.realpath(entry or os.curdir) != first]
    installed = importlib.machinery.PathFinder.find_spec(dep.name, rest)
    if installed is None:
        raise ImportError(f"mistralrs needs the {dep.name} package for {dep.needed_for}, but `import {dep.name}` "
                          f"finds {spec.origin or first} and no installed {dep.name} behind it; rename that file "
                          f"or install {dep.name}")
    logger.warning("%s is not the %s package; importing the installed one from %s", spec.origin,
                   dep.name, _spec_folder(installed))
    return _load(installed)


def _load(spec: importlib.machinery.ModuleSpec) -> ModuleType:
    """Run a found module and register it under its name, as `import` does."""
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return sys.modules[spec.name]


def _location(module: ModuleType) -> str:
    path = getattr(module, "__file__", None)
    return path if path else f"the module {module!r}"
