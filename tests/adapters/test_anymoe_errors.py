"""AnyMoE's bad input, each a ValueError naming the field (REFERENCE §8.10, issue 17's "Bad input")."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, ModelDType, Runner, Which
from mistralrs.api.load_spec import load_spec
from mistralrs.loader.spec import AnyMoeSpec, LoadKind, LoadSpec
from tests.adapters.adapter_fixtures import write_config_base, write_lora_adapters
from tests.loading import load_which
from tests.models import test_mixtral
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama base, a llama expert, a qwen2 "expert", a rank-2 LoRA adapter on the base's gate_proj and a
    Mixtral base, with a good dataset."""
    root = tmp_path_factory.mktemp("anymoe_errors")
    make_tiny_model_dir(root / "base", "llama")
    make_tiny_model_dir(root / "expert", "llama", seed=1)
    make_tiny_model_dir(root / "qwen2", "qwen2", seed=2)
    write_config_base(root / "mixtral", transformers.MixtralConfig(**test_mixtral.TINY))
    write_lora_adapters(root / "base", root / "adapters",
                        {"r2": (1, dict(r=2, lora_alpha=4, target_modules=["gate_proj"]))})
    rows = [{"prompt": "hi", "expert": 0}, {"prompt": "yo", "expert": 1}]
    (root / "amoe.json").write_text(json.dumps({"rows": rows}))
    return root


def _config(models, **overrides) -> AnyMoeConfig:
    fields = dict(hidden_size=64, dataset_json=str(models / "amoe.json"), prefix="model.layers", mlp="mlp",
                  model_ids=[str(models / "expert")], expert_type=AnyMoeExpertType.FineTuned(), epochs=1)
    fields.update(overrides)
    return AnyMoeConfig(**fields)


def _load(models, base: str = "base", **overrides):
    return load_which(Which.Plain(model_id=str(models / base), dtype=ModelDType.F32),
                      anymoe_config=_config(models, **overrides), show_progress=False)


def test_an_unsupported_architecture(models):
    with pytest.raises(ValueError, match=r"anymoe_config: AnyMoE does not support MixtralForCausalLM"):
        _load(models, "mixtral", hidden_size=64)


def test_a_row_with_an_expert_out_of_range(models, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rows": [{"prompt": "hi", "expert": 0}, {"prompt": "yo", "expert": 2}]}))
    with pytest.raises(ValueError, match=r"dataset_json: rows\[1\]\.expert is 2: it must be an int in 0\.\.1"):
        _load(models, dataset_json=str(path))


@pytest.mark.parametrize("content", ["{not json", json.dumps({"rows": []}), json.dumps({"rows": [{"expert": 0}]}),
                                     json.dumps({"rows": [{"prompt": "hi", "expert": 0, "image_urls": ["a.png"]}]})])
def test_a_malformed_dataset(models, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"anymoe_config\.dataset_json"):
        _load(models, dataset_json=str(path))


def test_a_missing_dataset_file(models, tmp_path):
    with pytest.raises(ValueError, match=r"anymoe_config\.dataset_json: no such file"):
        _load(models, dataset_json=str(tmp_path / "absent.json"))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", 0.0), ("lr", -1e-3), ("batch_size", 0)])
def test_bad_training_settings(models, field, value):
    with pytest.raises(ValueError, match=rf"AnyMoeConfig\.{field}"):
        _config(models, **{field: value})
    config = _config(models)
    setattr(config, field, value)   # changed after construction: the conversion checks again
    with pytest.raises(ValueError, match=rf"anymoe_config\.{field}"):
        load_spec(Which.Plain(model_id=str(models / "base")), anymoe_config=config)


def test_the_spec_checks_its_fields():
    spec = AnyMoeSpec(hidden_size=8, dataset_json="d.json", prefix="model.layers", mlp="mlp", model_ids=("e",))
    for field, value in [("lr", float("nan")), ("hidden_size", 0), ("model_ids", ()), ("layers", (-1,)),
                         ("loss_csv_path", "loss.txt"), ("prefix", "")]:
        with pytest.raises(ValueError, match=rf"anymoe_config\.{field}"):
            dataclasses.replace(spec, **{field: value})
    with pytest.raises(ValueError, match=r"anymoe_config\.gate_model_id is required"):
        dataclasses.replace(spec, training=False)
    with pytest.raises(ValueError, match=r"anymoe_config applies to full-precision models"):
        LoadSpec(LoadKind.GGUF, label="Which.GGUF", model_id="m", filenames=("m.gguf",), anymoe=spec)


def test_selection_errors_name_their_field(models):
    with pytest.raises(ValueError, match=r"anymoe_config\.hidden_size is 32, but the model's hidden_size is 64"):
        _load(models, hidden_size=32)
    with pytest.raises(ValueError, match=r"anymoe_config\.layers: \[5\] out of range: the model has 2"):
        _load(models, layers=[0, 5])
    with pytest.raises(ValueError, match=r"anymoe_config\.mlp: decoder layer model\.layers\.0 has no MLP named"):
        _load(models, mlp="feed_forward")
    with pytest.raises(ValueError, match=r"anymoe_config\.prefix: the model has no module 'layers'"):
        _load(models, prefix="layers")
    with pytest.raises(ValueError, match=r"model_ids: .*qwen2.* is a Qwen2ForCausalLM"):
        _load(models, model_ids=[str(models / "qwen2")])
    lora = AnyMoeExpertType.LoraAdapter(rank=4, alpha=8.0, target_modules=["gate_proj"])
    with pytest.raises(ValueError, match=r"layer 0: no gate_proj\.lora_A\.weight .*target_modules"):
        _load(models, expert_type=lora)   # a fine-tuned checkpoint is no adapter
    with pytest.raises(ValueError, match=r"anymoe_config\.expert_type\.rank is 4, but .* gate_proj has rank 2"):
        _load(models, expert_type=lora, model_ids=[str(models / "adapters" / "r2")])
    lora = AnyMoeExpertType.LoraAdapter(rank=2, alpha=8.0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"no q_proj\.lora_A\.weight"):
        _load(models, expert_type=lora, model_ids=[str(models / "adapters" / "r2")])


def test_anymoe_applies_to_plain_models_only(models):
    which = Which.XLora(xlora_model_id="x", order="o.json", model_id=str(models / "base"))
    with pytest.raises(ValueError, match=r"Which\.XLora: anymoe_config applies to full-precision models"):
        Runner(which, anymoe_config=_config(models))
    with pytest.raises(TypeError, match=r"anymoe_config must be an AnyMoeConfig"):
        Runner(Which.Plain(model_id=str(models / "base")), anymoe_config={"hidden_size": 64})


def test_saved_gates_that_do_not_fit(models, tmp_path):
    save_file({"moe_gate.0.weight": torch.zeros(2, 64), "moe_gate.0.bias": torch.zeros(2),
               "moe_gate.1.weight": torch.zeros(3, 64), "moe_gate.1.bias": torch.zeros(3)},
              str(tmp_path / "gate.safetensors"))
    with pytest.raises(ValueError, match=r"gate_model_id .*'moe_gate\.1\.weight' has shape \(3, 64\)"):
        _load(models, training=False, gate_model_id=str(tmp_path))
    with pytest.raises(ValueError, match=r"gate_model_id .*gates for layers AnyMoE is not applied to"):
        _load(models, training=False, gate_model_id=str(tmp_path), layers=[0])
