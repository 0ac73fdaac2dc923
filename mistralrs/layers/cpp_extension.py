"""C++ extensions compiled once per machine, cached on disk and imported once per process (`LazyExtension`).

An extension is cached under `~/.cache/mistralrs/extensions` (`$XDG_CACHE_HOME` respected) by a hash of its
source and the project headers it includes (`includes`), the compiler flags and the torch and Python versions; a
process that finds its build there imports it (~40 ms). Otherwise it is compiled with the system C++ compiler (`$CXX`, else `c++`) against the installed torch,
at most once at a time per cache key on the machine:

- Builds of one key are serialised by an flock on `<name>.lock` beside the cache entry. The kernel releases it
  when its holder dies, so a crashed build never blocks the next one (torch's `FileBaton`, an O_EXCL file, stays
  behind when its holder dies and makes every later process wait forever). A process that finds the lock taken
  waits for it in its background thread (its `get()` answers None meanwhile: the caller runs its plain path),
  then imports the holder's build, or builds itself when the holder left none (its build failed or was killed).
- The holder compiles through a detached helper (mistralrs/layers/build_extension.py, run with `python -I` so
  that it imports neither torch nor this package) in its own session, which inherits the lock, compiles into a
  temporary folder of the cache, renames the result into place and removes the folder. A process that exits
  during its build leaves the helper to finish and install it, and the next process imports the result. Killing
  the compiler when its starter dies (prctl's PR_SET_PDEATHSIG) would throw that work away every time: a short
  process would never get a build, and each would pay for its own compile.
- The lock holder first removes the temporary folders of earlier builds that died (its own key's, and another
  key's when that key's lock is free).
- A background build compiles at the lowest CPU priority (it runs beside the engine); `build()`, used by the
  Makefile's up-front step (`python -m mistralrs.layers.build_extension`), at normal priority. A process that
  waits for another's build gets it at the priority that build started with.

A build or import that fails logs one warning, and the process uses its plain path from then on.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

HELPER = Path(__file__).with_name("build_extension.py")  # the detached compile-and-install step
# a build's temporary folder: `<name>-<tempfile suffix>`, name = `<stem>_<16 hex digits of the cache key>`
TEMP_FOLDER = re.compile(r"(?P<name>\w+_[0-9a-f]{16})-[a-z0-9_]+")


class LazyExtension:
    """A C++ extension compiled on first use, cached on disk, and imported once per process.

    `get()` returns the module, or None while it is being built (here or by another process) or after the build
    failed. A cached build is imported at once; a missing one is built in a daemon thread. `get(wait=True)` blocks
    until the build has finished; `build()` too, and compiles at normal priority when this process builds.
    """

    def __init__(self, source: Path, stem: str, includes: Sequence[Path] = ()):
        self.source = source  # the .cpp file
        self.includes = tuple(includes)  # the project headers it includes: part of the cache key
        self.stem = stem  # module name prefix; the full name carries the cache key
        self._module: ModuleType | None = None  # once imported
        self._failed = False  # a build or import failed (warned once); never retried in this process
        self._builder: threading.Thread | None = None  # the background build, once started
        self._lock = threading.Lock()

    def get(self, wait: bool = False) -> ModuleType | None:
        """The module, or None while it builds (unless `wait`) or when it cannot be built."""
        if self._module is not None or self._failed:
            return self._module
        builder = self._start(low_priority=True)
        if wait and builder is not None:
            builder.join()
        return self._module

    def build(self) -> ModuleType | None:
        """The module once built and imported (None when it cannot be built); a compile started by this call runs
        at normal priority. For an up-front build step, where nothing else competes for the CPU."""
        if self._module is None and not self._failed:
            builder = self._start(low_priority=False)
            if builder is not None:
                builder.join()
        return self._module

    def cache_entry(self) -> tuple[str, Path]:
        """`(module name, path of its build in the cache)`; the name carries the cache key."""
        key = hashlib.sha256(self.source.read_bytes())
        for header in self.includes:
            key.update(header.name.encode() + b"\0" + header.read_bytes())
        key.update(" ".join([torch.__version__, sys.version, sys.platform, *_compile_flags()]).encode())
        name = f"{self.stem}_{key.hexdigest()[:16]}"
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistralrs" / "extensions"
        return name, cache / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"

    def _start(self, low_priority: bool) -> threading.Thread | None:
        """Imports the cached build, or starts the build thread once; returns that thread (None: no build)."""
        with self._lock:
            if self._module is None and not self._failed and self._builder is None:
                try:
                    name, path = self.cache_entry()
                except OSError as exc:  # the source is missing (an installation without the .cpp file)
                    self._fail(exc)
                    return None
                if path.is_file():
                    self._import(name, path)
                else:
                    self._builder = threading.Thread(target=self._build, args=(name, path, low_priority),
                                                     daemon=True, name=f"{self.stem}-build")
                    self._builder.start()
            return self._builder

    def _build(self, name: str, path: Path, low_priority: bool) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _open_lock(path.parent, name)
            try:
                if not _try_lock(lock):
                    logger.info("waiting for another process's build of %s", self.source.name)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.is_file():
                    self._compile(lock, name, path, low_priority)
            finally:
                os.close(lock)  # the helper, if one was started, has exited: nobody holds the lock now
            with self._lock:
                self._import(name, path)
        except (OSError, RuntimeError) as exc:
            self._fail(exc)

    def _compile(self, lock: int, name: str, path: Path, low_priority: bool) -> None:
        """Compiles and installs the build through the detached helper, holding the lock `lock` (an fd)."""
        remove_stale_builds(path.parent, name)
        temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{name}-"))
        command = _compile_command(self.source, name, temp / path.name, low_priority)
        logger.info("compiling %s (once; the plain path serves meanwhile)", self.source.name)
        with tempfile.TemporaryFile() as errors:
            try:
                helper = subprocess.Popen([sys.executable, "-I", str(HELPER), "--install", str(temp), str(path),
                                           "--", *command], pass_fds=(lock,), start_new_session=True,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            except OSError:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            returncode = helper.wait()
            if returncode != 0:
                errors.seek(0)
                message = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"the build exited with {returncode}: {message}")

    def _import(self, name: str, path: Path) -> None:
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (ImportError, OSError) as exc:
            self._fail(exc)
            return
        self._module = module

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        logger.warning("%s could not be built or loaded; using the plain path: %s", self.source.name, exc)


def remove_stale_builds(cache: Path, held: str) -> None:
    """Removes the temporary folders of builds that died: those of `held` (whose lock the caller holds), and
    another key's when nobody holds that key's lock (its folders then belong to no running build)."""
    for entry in cache.iterdir():
        match = TEMP_FOLDER.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        if match["name"] == held:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        lock = _open_lock(cache, match["name"])
        try:
            if _try_lock(lock):
                shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(lock)


def _open_lock(cache: Path, name: str) -> int:
    """An fd of the build lock file of `name` (created empty when missing; it stays, one per cache key)."""
    return os.open(cache / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(fd: int) -> bool:
    """Takes the exclusive flock on `fd` unless another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _compile_flags() -> list[str]:
    """Compiler, include and library flags for an extension of this torch (those torch's own builder uses)."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libraries = cpp_extension.library_paths()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-O2", "-std=c++20", "-w",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes),
            *(f"-L{p}" for p in libraries), *(f"-Wl,-rpath,{p}" for p in libraries),
            "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]


def _compile_command(source: Path, name: str, output: Path, low_priority: bool) -> list[str]:
    """The compiler call that builds `source` as the Python extension module `name`. With `low_priority`, at the
    lowest CPU priority (under `nice` where there is one): a background build runs beside the engine, whose first
    decode steps are being timed to choose their thread count (mistralrs/worker/cpu_threads.py)."""
    compiler, *flags = _compile_flags()
    nice = shutil.which("nice") if low_priority else None
    return [*([nice, "-n", "19"] if nice else []), compiler, str(source), "-o", str(output),
            f"-DTORCH_EXTENSION_NAME={name}", *flags]
