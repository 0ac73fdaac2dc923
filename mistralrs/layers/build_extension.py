"""Builds a C++ extension of mistralrs/layers/cpp_extension.py; two entry points.

`python -m mistralrs.layers.build_extension MODULE:NAME` builds the `LazyExtension` named NAME in MODULE now, at
normal priority, and returns once its build is in the cache (or another process's build, waited for); exit
status 1 when it cannot be built (the message says why; the plain path serves then). The Makefile's step.

`python -I build_extension.py --install TEMP OUTPUT -- COMMAND...` is the detached helper that LazyExtension
starts while it holds the build lock: it inherits the lock's fd (so the lock stays held while it runs, also
after its starter exits), runs COMMAND (which writes TEMP/<OUTPUT's name>), renames the result to OUTPUT and
removes TEMP. A TERM or INT signal stops the compiler and removes TEMP too. It imports only the standard
library, so that it starts fast and holds little memory beside the compiler; the package never imports this
module (so `-m` runs it without a second copy).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def install(temp: Path, output: Path, command: list[str]) -> int:
    """Runs `command`, then moves `temp / output.name` to `output` (atomic); removes `temp` in any case. Returns
    the exit status: 0, or 1 when the compiler failed (its error output's tail goes to stderr)."""
    try:
        try:  # its own process group, so that a stop reaches the compiler's own children (cc1plus, as, ld) too
            compiler = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        except OSError as exc:  # no such compiler
            sys.stderr.write(f"cannot run the compiler: {exc}")
            return 1
        with compiler:
            try:
                _, errors = compiler.communicate()
            except BaseException:
                os.killpg(compiler.pid, signal.SIGKILL)
                raise
        if compiler.returncode != 0:
            sys.stderr.write(f"compiler exited with {compiler.returncode}: {errors[-2000:]}")
            return 1
        os.replace(temp / output.name, output)
        return 0
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def build(target: str) -> int:
    """Builds the extension `MODULE:NAME` at normal priority; 0 once it is built and imports, else 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "compiling ...": make shows why it waits
    module_name, _, attribute = target.partition(":")
    extension = getattr(importlib.import_module(module_name), attribute)
    if extension.build() is None:
        print(f"{extension.source.name} was not built (see the warning above); its plain path will serve",
              file=sys.stderr)
        return 1
    print(f"{extension.source.name}: built ({extension.cache_entry()[1]})")
    return 0


def _stop(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through install(): the compiler is killed, TEMP removed


def main(argv: list[str]) -> int:
    if len(argv) > 4 and argv[0] == "--install" and argv[3] == "--":
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        return install(Path(argv[1]), Path(argv[2]), argv[4:])
    if len(argv) == 1 and ":" in argv[0]:
        return build(argv[0])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
