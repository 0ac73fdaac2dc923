"""Tensor-parallel loading through the loader (`pipeline.load` inside `building_for`), with LoRA and X-LoRA adapters
cut to each rank's shard, and a vision model (its tower whole on every rank, its text decoder sharded): 2 gloo
ranks give the single-process logits.

Cases: LoRA merged into the base; LoRA kept separate (preloaded, then switched); X-LoRA (layerwise, depth 2); LoRA on
Mixtral's experts (each rank a range of every expert's intermediate width) kept separate; LLaVA with two images.
Each adapter touches the column-parallel (q/k/v, gate/up) and the row-parallel (o, down) projections.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs import ModelDType, VisionArchitecture, Which
from mistralrs.adapters import activate_adapters
from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.distributed.group import TPGroup, building_for
from mistralrs.loader.spec import IsqSpec, LoadKind, LoadSpec
from tests.adapters import test_moe_adapters as moe_lora
from tests.adapters.adapter_fixtures import (
    make_base_and_adapters, packed_logits, peft_xlora_model, scheduled, write_config_base, write_ordering,
    write_xlora_repo,
)
from tests.distributed.tp_harness import run_on_ranks
from tests.loading import load_which
from tests.models import family_harness as harness
from tests.models import test_mixtral
from tests.vision.tiny_vision import make_tiny_llava_dir, sample_images, vision_prompt_logits

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOKENS = list(range(3, 60, 3))
OTHER = [7, 9, 44, 2, 5, 61, 30, 30, 12]
ATOL = 1e-4
LLAVA_PROMPT = "<|im_start|>user\nCompare <image> with\n<image>\nplease.<|im_end|>\n<|im_start|>assistant\n"


def _plain(loaded) -> list[torch.Tensor]:
    return packed_logits(loaded, [TOKENS, OTHER], lambda b: loaded.model(b.input_ids, b.positions, b))


def run_cases(cases: dict[str, tuple[Which, list]]) -> dict[str, list[torch.Tensor]]:
    """name -> logits of both prompts (for each adapter set in turn when sets are given; X-LoRA through its
    runtime); for "llava" the logits of its prompt (token ids given) with the sample images."""
    results = {}
    for name, (which, sets) in cases.items():
        loaded = load_which(which, show_progress=False)
        if name == "llava":
            inputs = loaded.vision_processor.preprocess(sample_images()[:2])
            results[name] = [vision_prompt_logits(loaded.model, sets, inputs)]
            continue
        if name == "xlora":
            runtime = adapter_runtime_of(loaded.model)
            results[name] = packed_logits(loaded, [TOKENS, OTHER], lambda b: runtime.forward(
                loaded.model, b, scheduled([0, 1]), [None, None]))
            continue
        results[name] = _plain(loaded)
        for names in sets or []:
            activate_adapters(loaded.model, names)
            results[name] += _plain(loaded)
    return results


def _on_rank(group: TPGroup, cases: dict) -> dict:
    with building_for(group):
        return run_cases(cases)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (rank 0's logits, the single process's)."""
    root = tmp_path_factory.mktemp("tp_adapters")
    base, adapters = make_base_and_adapters(root, ["a1", "a2", "a3"])
    oracle = peft_xlora_model(base, adapters, ["a1", "a2"], dict(xlora_depth=2, xlora_size=16,
                                                                  layerwise_scalings=True))
    write_xlora_repo(root / "xlora", oracle, adapters, ["a1", "a2"], str(base))

    moe_base, moe_adapters = root / "moe_base", root / "moe_adapters"
    config = transformers.MixtralConfig(**test_mixtral.TINY)
    write_config_base(moe_base, config, prepare=lambda m: harness.sharpen(m, seed=5))
    for name, (seed, rank, alpha, rslora, targets, experts) in moe_lora.SPECS.items():
        moe_lora._write_adapter(moe_adapters / name, moe_lora._make_adapter(config, seed, rank, targets, experts),
                                rank, alpha, rslora, targets)

    def lora(file: str, adapters_dir, base_dir, **ordering) -> Which.Lora:
        return Which.Lora(adapters_model_id=str(adapters_dir), dtype=ModelDType.F32,
                          order=write_ordering(root / file, base_dir, **ordering))

    llava = root / "llava"
    _, llava_processor = make_tiny_llava_dir(llava)
    llava_ids = llava_processor(images=sample_images()[:2], text=LLAVA_PROMPT, return_tensors="pt")["input_ids"]
    cases = {
        "llava": (Which.VisionPlain(model_id=str(llava), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32),
                  llava_ids[0].tolist()),
        "lora_merged": (lora("merged.json", adapters, base, order=["a1", "a3"]), None),
        "lora_preloaded": (lora("preloaded.json", adapters, base, order=["a1"], preload_adapters=[
            {"name": "a3", "adapter_model_id": str(adapters)}]), [["a3"], ["a1", "a3"]]),
        "xlora": (Which.XLora(xlora_model_id=str(root / "xlora"), dtype=ModelDType.F32,
                              order=write_ordering(root / "xlora.json", base, order=["a1", "a2"])), None),
        "moe_lora_preloaded": (lora("moe.json", moe_adapters, moe_base, order=["a1"], preload_adapters=[
            {"name": "a2", "adapter_model_id": str(moe_adapters)}]), [["a2"], ["a1", "a2"]]),
    }
    sharded = run_on_ranks(_on_rank, cases)
    return {name: (sharded[name], run_cases({name: case})[name]) for name, case in cases.items()}


@pytest.mark.parametrize("name", ["lora_merged", "lora_preloaded", "xlora", "moe_lora_preloaded", "llava"])
def test_two_ranks_equal_one_process(runs, name):
    sharded, whole = runs[name]
    assert len(sharded) == len(whole)
    for ours, ref in zip(sharded, whole):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def _refused(group: TPGroup, spec: LoadSpec) -> str:
    from mistralrs.loader.pipeline import load

    with building_for(group):
        try:
            load(spec)
        except ValueError as error:
            return str(error)
    return "loaded"


def test_options_not_sharded_are_refused_by_name():
    group = TPGroup(0, 2)
    spec = LoadSpec(LoadKind.PLAIN, "Which.Plain", "unused", num_device_layers=("1",))
    assert "num_device_layers cannot be combined with tensor parallelism" in _refused(group, spec)
    spec = LoadSpec(LoadKind.PLAIN, "Which.Plain", "unused", isq=IsqSpec(calibration_file="calibration.txt"))
    assert "calibration_file cannot be combined with tensor parallelism" in _refused(group, spec)
