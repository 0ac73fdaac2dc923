"""LoRA on Which.Lora (REFERENCE §6.1-6.2), checked against `peft` with the same adapters on the same tiny base."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

from mistralrs import ModelDType, Runner, Which
from mistralrs.adapters import activate_adapters
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.adapters.adapter_fixtures import assert_close
from tests.loading import load_which
from tests.tiny_models import make_tiny_model_dir

TOKENS = list(range(3, 60, 2))
ADAPTERS = {  # name -> (seed, LoraConfig arguments)
    "a1": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])),
    "a2": (2, dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
}


def _base(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _make_dirs(root, arch: str):
    base, adapters = root / "base", root / "adapters"
    make_tiny_model_dir(base, arch)
    for name, (seed, kwargs) in ADAPTERS.items():
        torch.manual_seed(seed)
        model = peft.get_peft_model(_base(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():   # make the deltas large enough that a missed or doubled adapter shows
            for name_, param in model.named_parameters():
                if "lora_B" in name_:
                    param.mul_(20.0)
        model.save_pretrained(adapters / name)
    return base, adapters


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return _make_dirs(tmp_path_factory.mktemp("lora"), "llama")


def _peft_logits(dirs, names: list[str], merged: bool) -> torch.Tensor:
    base, adapters = dirs
    model = _base(base)
    if names:
        model = peft.PeftModel.from_pretrained(model, adapters / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters / name, adapter_name=name)
        if merged:
            model = model.merge_and_unload(adapter_names=names)
        else:
            model.base_model.set_adapter(names)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]


def _logits(loaded) -> torch.Tensor:
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), 4, 32, loaded.dtype, loaded.device)
    batch = ForwardBatch.build([SeqChunk(TOKENS, 0, [0, 1, 2, 3])], 32, kv, loaded.device)
    with torch.inference_mode():
        return loaded.model.compute_logits(loaded.model(batch.input_ids, batch.positions, batch)).cpu()


def _which(dirs, tmp_path, ordering: dict, *, model_id="same") -> Which.Lora:
    base, adapters = dirs
    path = tmp_path / "ordering.json"
    path.write_text(json.dumps({"base_model_id": str(base), **ordering}))
    return Which.Lora(adapters_model_id=str(adapters), order=str(path),
                      model_id=str(base) if model_id == "same" else model_id, dtype=ModelDType.F32)


def _load(dirs, tmp_path, ordering: dict, **kwargs):
    return load_which(_which(dirs, tmp_path, ordering, **kwargs), show_progress=False)


def _close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(ours, expected)


@pytest.mark.parametrize("order", [["a1"], ["a2"], ["a1", "a2"]])
def test_merged_adapters_match_peft(dirs, tmp_path, order):
    loaded = _load(dirs, tmp_path, {"order": order}, model_id=None)   # base model from base_model_id
    expected = _peft_logits(dirs, order, merged=True)
    assert (expected - _peft_logits(dirs, [], merged=False)).abs().max().item() > 1e-2   # the adapters matter
    _close(_logits(loaded), expected)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_families_merged_and_preloaded(tmp_path, arch):
    family = _make_dirs(tmp_path, arch)
    merged = _load(family, tmp_path, {"order": ["a1", "a2"]})
    _close(_logits(merged), _peft_logits(family, ["a1", "a2"], merged=True))
    preloaded = _load(family, tmp_path, {"order": ["a2"], "preload_adapters": [
        {"name": "a1", "adapter_model_id": str(family[1])}]})
    _close(_logits(preloaded), _peft_logits(family, ["a2"], merged=False))


def test_preloaded_adapters_switch_like_peft(dirs, tmp_path):
    preload = [{"name": "a2", "adapter_model_id": str(dirs[1])}]
    loaded = _load(dirs, tmp_path, {"order": ["a1"], "preload_adapters": preload})
    _close(_logits(loaded), _peft_logits(dirs, ["a1"], merged=False))
    for active in (["a2"], ["a1", "a2"], []):
        activate_adapters(loaded.model, active)
        _close(_logits(loaded), _peft_logits(dirs, active, merged=False))
    with pytest.raises(ValueError, match="'a3'"):
        activate_adapters(loaded.model, ["a1", "a3"])


def test_a_step_applies_its_batchs_adapter_weights_not_the_active_set(dirs, tmp_path):
    preload = [{"name": "a2", "adapter_model_id": str(dirs[1])}]
    loaded = _load(dirs, tmp_path, {"order": ["a1"], "preload_adapters": preload})   # active set: a1
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), 4, 32, loaded.dtype, loaded.device)
    batch = ForwardBatch.build([SeqChunk(TOKENS, 0, [0, 1, 2, 3])], 32, kv, loaded.device)
    for weights, names in ((torch.tensor([0.0, 1.0]), ["a2"]), (None, [])):   # columns: a1, a2
        batch.adapter_weights = None if weights is None else weights.expand(len(TOKENS), -1)
        with torch.inference_mode(), batch.active():
            logits = loaded.model.compute_logits(loaded.model(batch.input_ids, batch.positions, batch)).cpu()
        _close(logits, _peft_logits(dirs, names, merged=False))


def test_runner_activate_adapters(dirs, tmp_path):
    preload = [{"name": "a2", "adapter_model_id": str(dirs[1])}]
    runner = Runner(_which(dirs, tmp_path, {"preload_adapters": preload}), prefix_cache_n=0, show_progress=False)
    try:
        runner.activate_adapters(["a2"])
        with pytest.raises(ValueError, match="'nope'"):
            runner.activate_adapters(["nope"])
    finally:
        runner.close()
    merged = Runner(_which(dirs, tmp_path, {"order": ["a1"]}), show_progress=False)
    try:
        with pytest.raises(ValueError, match="no preloaded LoRA adapters"):
            merged.activate_adapters(["a1"])
    finally:
        merged.close()


def _edit_config(dirs, name: str, **changes) -> None:
    adapters = dirs[1]
    shutil.copytree(adapters / "a1", adapters / name, dirs_exist_ok=True)
    config = json.loads((adapters / name / "adapter_config.json").read_text())
    config.update(changes)
    (adapters / name / "adapter_config.json").write_text(json.dumps(config))


def test_bad_inputs_name_the_offending_value(dirs, tmp_path):
    with pytest.raises(ValueError, match="Cannot load adapter 'nope'"):
        _load(dirs, tmp_path, {"order": ["nope"]})
    with pytest.raises(ValueError, match="base_model_id"):
        _load(dirs, tmp_path, {"order": ["a1"]}, model_id=str(tmp_path))
    with pytest.raises(ValueError, match="'model.layers.7.self_attn.q_proj'"):
        _load(dirs, tmp_path, {"order": ["a1"], "layers": {"model.layers.7.self_attn.q_proj": 0}})
    _edit_config(dirs, "bad_target", target_modules=["q_proj", "w_missing"])
    with pytest.raises(ValueError, match="'w_missing'"):
        _load(dirs, tmp_path, {"order": ["bad_target"]})
    _edit_config(dirs, "bad_rank", r=8)
    with pytest.raises(ValueError, match="rank mismatch"):
        _load(dirs, tmp_path, {"order": ["bad_rank"]})
