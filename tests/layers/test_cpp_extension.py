"""Building C++ extensions (mistralrs/layers/cpp_extension.py, build_extension.py) across processes.

Every test builds a tiny extension (one C function, seconds to compile) into a temporary `XDG_CACHE_HOME` with a
fake `CXX`: a script that logs each call (its pid, parent pid and niceness), waits until the test creates a `go`
file (so that a build is held at a known point without timing), and then runs the real `c++`. Processes are
waited for by polling with generous deadlines: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mistralrs
from mistralrs.layers.cpp_extension import LazyExtension

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

ROOT = Path(mistralrs.__file__).resolve().parents[1]  # the checkout the children import mistralrs from
DEADLINE = 300.0  # seconds; a loaded two-core machine can be slow, a correct build always gets there

TINY = r"""
#include <Python.h>
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define STR2(x) #x
#define STR(x) STR2(x)
static PyObject *answer(PyObject *, PyObject *) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef definition = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&definition); }
"""

FAKE_CXX = """#!/bin/sh
echo "$$ $PPID $(cut -d' ' -f19 /proc/$$/stat)" >> "{log}"
while [ ! -e "{go}" ]; do sleep 0.1; done
exec c++ "$@"
"""

# a process using the extension: "first" is what get() answers at once, "waited" what get(wait=True) gives;
# with "sleep" it stays alive after get() (to be killed during its build)
CHILD = """
import sys, time
from pathlib import Path
from mistralrs.layers.cpp_extension import LazyExtension
extension = LazyExtension(Path(sys.argv[1]), "tiny")
print("first", extension.get(), flush=True)
if sys.argv[2] == "sleep":
    time.sleep(3600)
module = extension.get(wait=True)
print("waited", module.answer() if module else None, flush=True)
"""


class Setup:
    """One test's tiny source, fake compiler, cache and child processes."""

    def __init__(self, tmp_path: Path):
        self.source = tmp_path / "tiny.cpp"  # the extension's source
        self.source.write_text(TINY)
        self.log = tmp_path / "cxx.log"  # one line per compiler call: pid, parent pid, niceness
        self.go = tmp_path / "go"  # the fake compiler waits for this file
        cxx = tmp_path / "fake-cxx"
        cxx.write_text(FAKE_CXX.format(log=self.log, go=self.go))
        cxx.chmod(0o755)
        self.cache = tmp_path / "cache"  # XDG_CACHE_HOME
        self.env = {**os.environ, "XDG_CACHE_HOME": str(self.cache), "CXX": str(cxx), "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}  # the environment of children
        self.children: list[subprocess.Popen] = []  # started by start()

    def start(self, mode: str) -> subprocess.Popen:
        """A child process in its own process group (as a shell job is), running CHILD in `mode`."""
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(self.source), mode], env=self.env,
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.children.append(child)
        return child

    def compiler_calls(self) -> list[tuple[int, int, int]]:
        """(pid, parent pid, niceness) of each compiler call so far."""
        if not self.log.exists():
            return []
        return [tuple(map(int, line.split())) for line in self.log.read_text().splitlines()]

    def extension(self, monkeypatch) -> LazyExtension:
        """The same extension in this process, with this setup's cache and compiler."""
        monkeypatch.setenv("XDG_CACHE_HOME", self.env["XDG_CACHE_HOME"])
        monkeypatch.setenv("CXX", self.env["CXX"])
        return LazyExtension(self.source, "tiny")

    def extensions_folder(self) -> Path:
        return self.cache / "mistralrs" / "extensions"

    def temp_folders(self) -> list[str]:
        return sorted(entry.name for entry in self.extensions_folder().iterdir() if entry.is_dir())


@pytest.fixture
def setup(tmp_path):
    made = Setup(tmp_path)
    yield made
    made.go.touch()  # lets a held build finish
    for child in made.children:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def compiling(pid: int) -> bool:
    """Whether the process `pid` still runs the compiler (a zombie or a reused pid does not)."""
    try:
        return b"tiny.cpp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def outcome(child: subprocess.Popen) -> list[str]:
    out, _ = child.communicate(timeout=DEADLINE)
    assert child.returncode == 0
    return out.splitlines()


def test_processes_started_together_compile_once_and_wait_for_that_build(setup):
    first, second = setup.start("wait"), setup.start("wait")
    assert first.stdout.readline().strip() == "first None"  # the plain path meanwhile
    assert second.stdout.readline().strip() == "first None"
    wait_for(lambda: setup.compiler_calls(), "the compiler to start")
    setup.go.touch()
    assert outcome(first) == ["waited 42"] and outcome(second) == ["waited 42"]
    assert len(setup.compiler_calls()) == 1
    assert setup.temp_folders() == []


def test_a_waiter_builds_when_the_lock_holder_left_no_build(setup, monkeypatch):
    name, path = setup.extension(monkeypatch).cache_entry()
    path.parent.mkdir(parents=True)
    held = os.open(path.parent / f"{name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a build in another process, which will die without a result
    setup.go.touch()
    child = setup.start("wait")
    assert child.stdout.readline().strip() == "first None"
    os.close(held)
    assert outcome(child) == ["waited 42"]
    assert len(setup.compiler_calls()) == 1


def test_the_build_outlives_its_starter_and_installs(setup, monkeypatch):
    extension = setup.extension(monkeypatch)
    name, path = extension.cache_entry()
    starter = setup.start("sleep")
    wait_for(lambda: setup.compiler_calls(), "the compiler to start")
    os.killpg(starter.pid, signal.SIGKILL)  # the starter's whole job, as a Ctrl-C or a closed terminal would
    starter.wait()
    setup.go.touch()
    wait_for(lambda: lock_is_free(path.parent / f"{name}.lock"), "the build to finish")
    (compiler, _, _), = setup.compiler_calls()
    wait_for(lambda: not compiling(compiler), "the compiler to exit")
    assert path.is_file() and setup.temp_folders() == []
    assert extension.get().answer() == 42  # imported from the cache: no second compile
    assert len(setup.compiler_calls()) == 1


def test_a_stopped_build_stops_its_compiler_and_leaves_nothing(setup, monkeypatch):
    name, path = setup.extension(monkeypatch).cache_entry()
    setup.start("sleep")
    wait_for(lambda: setup.compiler_calls(), "the compiler to start")
    (compiler, helper, _), = setup.compiler_calls()
    assert setup.temp_folders() != []
    os.kill(helper, signal.SIGTERM)
    wait_for(lambda: lock_is_free(path.parent / f"{name}.lock"), "the helper to stop")
    wait_for(lambda: not compiling(compiler), "the compiler to stop")
    assert not path.exists() and setup.temp_folders() == []


def test_stale_temp_folders_are_removed_unless_their_build_runs(setup, monkeypatch):
    extension = setup.extension(monkeypatch)
    name, path = extension.cache_entry()
    folder = setup.extensions_folder()
    for stale in (f"{name}-crashed1", "tiny_0123456789abcdef-crashed2", "tiny_fedcba9876543210-running"):
        (folder / stale).mkdir(parents=True)
        (folder / stale / "partial.o").write_bytes(b"\0")
    running = os.open(folder / "tiny_fedcba9876543210.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(running, fcntl.LOCK_EX)  # that key's build is alive
    setup.go.touch()
    try:
        assert extension.get(wait=True).answer() == 42
    finally:
        os.close(running)
    assert setup.temp_folders() == ["tiny_fedcba9876543210-running"]


def test_background_builds_run_at_low_priority_and_the_make_step_at_normal(setup, monkeypatch, tmp_path):
    (tmp_path / "tinymod.py").write_text("from pathlib import Path\nfrom mistralrs.layers.cpp_extension import "
                                         "LazyExtension\nEXTENSION = LazyExtension(Path(__file__).with_name("
                                         "'tiny.cpp'), 'tiny')\n")
    setup.go.touch()
    step = subprocess.run([sys.executable, "-m", "mistralrs.layers.build_extension", "tinymod:EXTENSION"],
                          env=setup.env, capture_output=True, text=True, timeout=DEADLINE)
    assert step.returncode == 0, step.stderr
    assert "tiny.cpp: built" in step.stdout
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    monkeypatch.setenv("CXX", setup.env["CXX"])
    assert LazyExtension(setup.source, "tiny").get(wait=True).answer() == 42
    own = os.nice(0)
    assert [nice for _, _, nice in setup.compiler_calls()] == [own, min(own + 19, 19)]


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch, caplog):
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    broken = LazyExtension(source, "mistralrs_broken_test")
    with caplog.at_level(logging.WARNING, logger="mistralrs.layers.cpp_extension"):
        assert broken.get(wait=True) is None
        assert broken.get(wait=True) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.cpp" in warnings[0].getMessage()
    assert "compiler exited with" in warnings[0].getMessage()
    assert [entry.name for entry in (tmp_path / "cache" / "mistralrs" / "extensions").iterdir()] == [
        f"{broken.cache_entry()[0]}.lock"]


def test_the_make_step_reports_a_failed_build(tmp_path):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    (tmp_path / "brokenmod.py").write_text("from pathlib import Path\nfrom mistralrs.layers.cpp_extension import "
                                           "LazyExtension\nEXTENSION = LazyExtension(Path(__file__).with_name("
                                           "'broken.cpp'), 'broken')\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    step = subprocess.run([sys.executable, "-m", "mistralrs.layers.build_extension", "brokenmod:EXTENSION"],
                          env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert step.returncode == 1
    assert "compiler exited with" in step.stderr and "broken.cpp was not built" in step.stderr


def test_the_cache_key_covers_the_included_headers(tmp_path, monkeypatch):
    """Editing a header the source includes (the native decode loops, the qdot/ kernels) gives a new build, not
    the old one."""
    from mistralrs.layers.fused_decode import EXTENSION, NATIVE_HEADER, QDOT_HEADERS

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert {path.name for path in QDOT_HEADERS} >= {"qdot.h", "legacy.h"}
    assert EXTENSION.includes == (NATIVE_HEADER, *QDOT_HEADERS)
    source, header = tmp_path / "mod.cpp", tmp_path / "part.h"
    source.write_text('#include "part.h"\n')
    header.write_text("// one\n")
    extension = LazyExtension(source, "mod", [header])
    first = extension.cache_entry()
    assert extension.cache_entry() == first
    header.write_text("// two\n")
    assert extension.cache_entry()[0] != first[0]
    assert LazyExtension(source, "mod").cache_entry()[0] not in (first[0], extension.cache_entry()[0])
