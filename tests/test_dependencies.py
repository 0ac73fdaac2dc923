"""A user's file named like a package never stands in for it (issue 11 item 4): the reference's own examples
include `gguf.py` and `llguidance.py` side by side, and Python puts the running script's folder first on
sys.path. GGUF is read without the `gguf` package; llguidance and PyYAML are imported at first use, past such a
file; anything else that is not the package is an ImportError naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

from mistralrs import dependencies
from mistralrs.dependencies import Dependency, import_dependency
from tests.loader.gguf_fixtures import write_tiny_gguf
from tests.tiny_models import hf_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("gguf", "llguidance", "yaml", "transformers", "sentencepiece")  # none needed to load and chat

_LOAD = """
    import sys
    import mistralrs
    from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which
    imported_by_mistralrs = sorted(m for m in {optional!r} if m in sys.modules)
    runner = Runner(which=Which.GGUF(quantized_model_id=sys.argv[1], quantized_filename="tiny.gguf"))
"""
GGUF_SCRIPT = _LOAD + """
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=3, temperature=0.0))
    print("tokens", res.usage.completion_tokens)
    print("imported at import", imported_by_mistralrs)
    print("imported after chat", sorted(m for m in {optional!r} if m in sys.modules))
"""
LLGUIDANCE_SCRIPT = _LOAD + """
    res = runner.send_completion_request(CompletionRequest(
        model="tiny", prompt="x", max_tokens=5, temperature=0.0, grammar="[ab]{{3}}", grammar_type="regex"))
    print("text", repr(res.choices[0].text))
"""


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    """A folder like the reference's examples/python: `gguf.py` and `llguidance.py` next to a tiny GGUF model."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("examples")
    config = hf_config("llama", 320)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    write_tiny_gguf(model, config, folder / "tiny.gguf", ggml_type="Q8_0")
    (folder / "gguf.py").write_text(textwrap.dedent(GGUF_SCRIPT.format(optional=OPTIONAL)))
    (folder / "llguidance.py").write_text(textwrap.dedent(LLGUIDANCE_SCRIPT.format(optional=OPTIONAL)))
    return folder


def _run_script(folder, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_script_named_gguf_loads_a_gguf_model_and_imports_no_optional_package(example_folder):
    done = _run_script(example_folder, "gguf.py")
    assert done.returncode == 0, done.stderr
    assert "tokens " in done.stdout
    assert "imported at import []" in done.stdout  # llguidance and PyYAML wait for their feature; gguf never comes
    assert "imported after chat []" in done.stdout


def test_a_script_named_llguidance_gets_the_installed_llguidance(example_folder):
    done = _run_script(example_folder, "llguidance.py")
    assert done.returncode == 0, done.stderr
    text = done.stdout.split("text ", 1)[1].strip().strip("'")
    assert len(text) == 3 and set(text) <= {"a", "b"}, done.stdout
    assert f"{example_folder / 'llguidance.py'} is not the llguidance package" in done.stderr


# ---------------------------------------------------------------------------------------------------------
# The rules of import_dependency, on a made-up package (nothing real is replaced in this process).

def _fake_dependency(monkeypatch, name: str = "mrs_fake_dep") -> Dependency:
    dep = Dependency(name, "MARKER", "testing")
    monkeypatch.setitem(dependencies.DEPENDENCIES, name, dep)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return dep


def _installed_copy(folder) -> None:
    package = folder / "mrs_fake_dep"
    package.mkdir()
    (package / "__init__.py").write_text("MARKER = 'installed'\n")


def test_a_file_in_the_first_folder_is_passed_over_for_the_installed_package(tmp_path, monkeypatch):
    _fake_dependency(monkeypatch)
    first, site = tmp_path / "script_folder", tmp_path / "site"
    first.mkdir(), site.mkdir()
    (first / "mrs_fake_dep.py").write_text("raise SystemExit('the user file ran')\n")
    _installed_copy(site)
    monkeypatch.setattr(sys, "path", [str(first), str(site), *sys.path])
    try:
        module = import_dependency("mrs_fake_dep")
        assert module.MARKER == "installed" and sys.modules["mrs_fake_dep"] is module
        assert import_dependency("mrs_fake_dep") is module
    finally:
        sys.modules.pop("mrs_fake_dep", None)


def test_a_file_in_the_first_folder_with_nothing_behind_it_is_named(tmp_path, monkeypatch):
    _fake_dependency(monkeypatch)
    (tmp_path / "mrs_fake_dep.py").write_text("raise SystemExit('the user file ran')\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(ImportError, match=rf"finds {tmp_path / 'mrs_fake_dep.py'} and no installed mrs_fake_dep"):
        import_dependency("mrs_fake_dep")
    assert "mrs_fake_dep" not in sys.modules


def test_a_module_that_is_not_the_package_is_named(tmp_path, monkeypatch):
    _fake_dependency(monkeypatch)
    impostor = types.ModuleType("mrs_fake_dep")
    impostor.__file__ = str(tmp_path / "elsewhere" / "mrs_fake_dep.py")
    monkeypatch.setitem(sys.modules, "mrs_fake_dep", impostor)
    with pytest.raises(ImportError, match=r"gives .*elsewhere/mrs_fake_dep\.py, which is not it \(no "
                                          r"mrs_fake_dep\.MARKER\); rename that file"):
        import_dependency("mrs_fake_dep")


def test_the_installed_package_found_first_is_imported_as_usual(tmp_path, monkeypatch):
    _fake_dependency(monkeypatch)
    first, site = tmp_path / "script_folder", tmp_path / "site"
    first.mkdir(), site.mkdir()
    _installed_copy(site)
    monkeypatch.setattr(sys, "path", [str(first), str(site), *sys.path])
    try:
        assert import_dependency("mrs_fake_dep").MARKER == "installed"
    finally:
        sys.modules.pop("mrs_fake_dep", None)


def test_every_core_dependency_is_a_known_dependency_with_its_marker():
    for name in dependencies.CORE_DEPENDENCIES:
        assert hasattr(import_dependency(name), dependencies.DEPENDENCIES[name].marker), name
