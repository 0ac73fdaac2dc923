"""`import mistralrs` and a text model's Runner leave the modules of features they do not use unimported (issue 20):
the HTTP server stack, grammars, vision models and PIL, diffusion, transformers-only helpers, YAML topologies;
jinja2 waits for the first chat template compiled. Each check runs in a fresh interpreter and reads sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.loader.gguf_fixtures import write_tiny_gguf
from tests.tiny_models import hf_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# imported by the features that need them only (a GGUF text model serving chat needs none of them)
FEATURE_MODULES = ("fastapi", "uvicorn", "starlette", "pydantic", "openai", "llguidance", "PIL", "diffusers",
                   "transformers", "gguf", "yaml", "sentencepiece", "mistralrs.server", "mistralrs.vision.base",
                   "mistralrs.vision.registry", "mistralrs.loader.vision_loader", "mistralrs.diffusion",
                   "mistralrs.loader.diffusion_loader", "mistralrs.engine.image_prompt", "mistralrs.engine.images")

SCRIPT = """
    import json, sys
    watched = {watched!r}
    found = {{}}
    import mistralrs
    found["import"] = sorted(m for m in watched if m in sys.modules)
    from mistralrs import ChatCompletionRequest, Runner, Which
    runner = Runner(which=Which.GGUF(quantized_model_id=sys.argv[1], quantized_filename="tiny.gguf"),
                    show_progress=False)
    found["runner"] = sorted(m for m in watched if m in sys.modules)
    runner.send_chat_completion_request(ChatCompletionRequest(
        model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=2, temperature=0.0))
    found["chat"] = sorted(m for m in watched if m in sys.modules)
    runner.close()
    print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, list[str]]:
    """The watched modules present after `import mistralrs`, after building a GGUF Runner, after one chat."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("lazy")
    config = hf_config("llama", 320)
    torch.manual_seed(0)
    write_tiny_gguf(transformers.LlamaForCausalLM(config).eval(), config, folder / "tiny.gguf", ggml_type="Q8_0")
    script = folder / "check.py"
    script.write_text(textwrap.dedent(SCRIPT.format(watched=FEATURE_MODULES + ("jinja2",))))
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_mistralrs_imports_no_feature_module_and_no_jinja2(imported):
    assert imported["import"] == []


def test_a_gguf_runner_compiles_its_chat_template_with_jinja2_and_imports_nothing_else(imported):
    assert imported["runner"] == ["jinja2"]
    assert imported["chat"] == ["jinja2"]


def test_the_vision_registry_still_knows_every_family_when_first_read_in_a_fresh_process():
    code = ("from mistralrs.vision.registry import supported_vision_archs, vision_family_for\n"
            "print(len(supported_vision_archs()), vision_family_for(['LlavaForConditionalGeneration'], None)"
            ".arch_name)\n")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, llava = done.stdout.split()
    from mistralrs.api.enums import VisionArchitecture

    assert int(count) == len(VisionArchitecture) and llava == "LLaVA"
