"""The terminal image mode: `mistralrs-server -i diffusion-plain ...` and `mistralrs chat diffusion-plain ...`."""

from __future__ import annotations

import io
import re
import sys

import pytest

from mistralrs.cli import main, server_main

from .tiny_flux import build_pipeline, save_pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_pipeline(build_pipeline(guidance=False), tmp_path_factory.mktemp("flux-cli"))


@pytest.mark.parametrize("entry,prefix", [(server_main, ["-i"]), (main, ["chat"])])
def test_interactive_mode_saves_images(checkpoint, tmp_path, monkeypatch, capsys, entry, prefix):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red cat\n\n/help\nthe moon\n\\exit\n"))
    entry([*prefix, "diffusion-plain", "-m", checkpoint, "-a", "flux", "-d", "f32", "--height", "16",
           "--width", "32"])
    out = capsys.readouterr().out
    assert "Generating 32x16 images with" in out
    saved = re.findall(r"Image saved to (image-generation-[0-9a-f-]+\.png)", out)
    assert len(saved) == 2 and all((tmp_path / name).is_file() for name in saved)
