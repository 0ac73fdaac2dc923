"""Automatic device mapping (REFERENCE §8.13): the planner (worker/auto_device_map.py) against made-up device sizes,
the size estimate (loader/auto_map.py) of tiny models dense, ISQ-packed, from UQFF and from GGUF, with KV and vision
extras, and the Runner reading `auto_map_params` on the CPU. Where CUDA exists, a model larger than the GPU's free
memory loads with its last layer on the CPU and generates what it generates on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import pytest
import torch

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs.api.enums import TextAutoMapParams
from mistralrs.layers.linear import dense_weights_on_meta
from mistralrs.loader.auto_map import auto_placement, isq_bytes_per_weight, measure_model, weight_bytes_rule
from mistralrs.models.config import TextModelConfig
from mistralrs.models.registry import model_class_for
from mistralrs.quant.isq import isq_config_from_options
from mistralrs.quant.isq_types import parse_isq_type
from mistralrs.quant.topology import Topology
from mistralrs.worker.auto_device_map import AutoMapParams, ModelSizes, plan_layers, plan_summary
from mistralrs.worker.device_map import DeviceMap, DeviceMapSpec
from tests.tiny_models import make_tiny_model_dir

CPU, META = torch.device("cpu"), torch.device("meta")
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---- the planner ---------------------------------------------------------------------------------------------

def _sizes(layers, non_layer=5, activation=2) -> ModelSizes:
    return ModelSizes(tuple(layers), non_layer, activation)


def test_fills_the_gpus_in_order_and_spills_the_rest_to_the_cpu():
    # GPU 0: 30 - 2 (activations) - 5 (embeddings, head) = 23 -> two layers of 10; GPU 1: 25 - 2 -> two more
    assert plan_layers(_sizes([10] * 5), [(GPU0, 30), (GPU1, 25)]) == (GPU0, GPU0, GPU1, GPU1, CPU)
    assert plan_layers(_sizes([10] * 5), [(GPU1, 30), (GPU0, 25)]) == (GPU1, GPU1, GPU0, GPU0, CPU)   # main first


def test_a_model_that_fits_stays_on_the_main_gpu():
    assert plan_layers(_sizes([10] * 3), [(GPU0, 37), (GPU1, 100)]) == (GPU0,) * 3
    assert plan_layers(_sizes([10] * 3), [(GPU0, 36), (GPU1, 100)]) == (GPU0, GPU0, GPU1)   # one byte short


def test_layers_stay_consecutive_a_small_later_layer_does_not_jump_the_queue():
    assert plan_layers(_sizes([5, 20, 5]), [(GPU0, 19)]) == (GPU0, CPU, CPU)


def test_a_model_larger_than_every_gpu_runs_mostly_on_the_cpu():
    assert plan_layers(_sizes([100] * 4), [(GPU0, 50), (GPU1, 50)]) == (CPU,) * 4
    assert plan_layers(_sizes([100] * 4), [(GPU0, 150), (GPU1, 50)]) == (GPU0, CPU, CPU, CPU)


def test_without_gpus_every_layer_is_on_the_cpu():
    assert plan_layers(_sizes([10] * 3), []) == (CPU,) * 3


def test_the_main_gpu_must_hold_the_non_layer_part():
    with pytest.raises(ValueError, match=r"embeddings, LM head and activations need .* than the .* free on cuda:0"):
        plan_layers(_sizes([10], non_layer=50), [(GPU0, 40), (GPU1, 1000)])


def test_the_summary_has_one_line_per_device():
    plan = plan_layers(_sizes([2**30] * 5, non_layer=2**29, activation=2**28), [(GPU0, 3 * 2**30), (GPU1, 2**31)])
    assert plan_summary(plan, _sizes([2**30] * 5, non_layer=2**29, activation=2**28),
                        [(GPU0, 3 * 2**30), (GPU1, 2**31)]) == [
        "cuda:0: layers 0-1 (2.75 GiB planned of 3.00 GiB free)",
        "cuda:1: layer 2 (1.25 GiB planned of 2.00 GiB free)",
        "cpu: layers 3-4 (2.00 GiB planned)",
    ]


@pytest.mark.parametrize("bad, message", [
    (dict(max_seq_len=0), "max_seq_len must be >= 1"), (dict(max_batch_size=True), "max_batch_size must be an int"),
    (dict(max_num_images=-1), "max_num_images must be >= 0"),
])
def test_auto_map_params_are_validated(bad, message):
    with pytest.raises((ValueError, TypeError), match=f"AutoMapParams.{message}"):
        AutoMapParams(**bad)


# ---- the size estimate ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("auto-map-llama")
    make_tiny_model_dir(path, "llama")
    return path


def _meta_model(tiny_dir):
    config = TextModelConfig.from_hf_dict(json.loads((tiny_dir / "config.json").read_text()))
    with dense_weights_on_meta():
        model = model_class_for(config.architectures, None)(config, dtype=torch.float32, device=CPU)
    return model, config


LINEAR_WEIGHTS = 64 * (64 + 32 + 32) + 64 * 64 + 2 * 128 * 64 + 64 * 128   # one tiny Llama layer's q/k/v/o/MLP
NORMS = 2 * 64 * 4
KV_PER_TOKEN = 2 * 2 * 16 * 4                                             # K and V, 2 heads of 16, float32


def test_dense_layers_count_weights_norms_and_kv_for_every_planned_token(tiny_dir):
    model, config = _meta_model(tiny_dir)
    sizes = measure_model(model, config, torch.float32, AutoMapParams(max_seq_len=128), weight_bytes_rule(
        model, None, None))
    assert sizes.layer_bytes == (LINEAR_WEIGHTS * 4 + NORMS + 128 * KV_PER_TOKEN,) * 2
    longer = measure_model(model, config, torch.float32, AutoMapParams(max_seq_len=256, max_batch_size=3),
                           weight_bytes_rule(model, None, None))
    assert longer.layer_bytes[0] - sizes.layer_bytes[0] == (256 * 3 - 128) * KV_PER_TOKEN
    assert longer.activation_bytes > sizes.activation_bytes


def test_isq_counts_the_packed_bytes_of_each_layers_type(tiny_dir, tmp_path):
    model, config = _meta_model(tiny_dir)
    params = AutoMapParams(max_seq_len=128)
    (tmp_path / "t.yml").write_text("1: {isq: Q8_0}\n")
    isq = isq_config_from_options(parse_isq_type("Q4_0"), topology=Topology.from_yaml(str(tmp_path / "t.yml")))
    sizes = measure_model(model, config, torch.float32, params, weight_bytes_rule(model, isq, None))
    kv = 128 * KV_PER_TOKEN
    assert sizes.layer_bytes == (int(LINEAR_WEIGHTS * 18 / 32) + NORMS + kv, int(LINEAR_WEIGHTS * 34 / 32) + NORMS + kv)
    dense = measure_model(model, config, torch.float32, params, weight_bytes_rule(model, None, None))
    assert dense.non_layer_bytes - sizes.non_layer_bytes == int(64 * 99 * (4 - 18 / 32))   # the LM head packed too
    assert isq_bytes_per_weight(parse_isq_type("HQQ4")) == 0.5 + 4 / 64
    assert isq_bytes_per_weight(parse_isq_type("FP8")) == 1.0


def test_uqff_spreads_the_files_size_over_the_layers_it_holds(tiny_dir, tmp_path):
    from mistralrs.quant.uqff import UqffQuantConfig
    model, config = _meta_model(tiny_dir)
    weights = 2 * LINEAR_WEIGHTS + 64 * 99
    (tmp_path / "m.uqff").write_bytes(b"\0" * (weights // 4))   # a quarter byte per weight
    rule = weight_bytes_rule(model, UqffQuantConfig(str(tmp_path / "m.uqff")), None)
    sizes = measure_model(model, config, torch.float32, AutoMapParams(max_seq_len=1), rule)
    assert sizes.layer_bytes[0] == pytest.approx(LINEAR_WEIGHTS / 4 + NORMS + KV_PER_TOKEN, abs=8)


def test_gguf_counts_each_tensors_stored_type(tiny_dir):
    model, config = _meta_model(tiny_dir)
    names = [n for n in model.expected_weight_names() if ".layers.0." in n and n.endswith("proj.weight")]
    rule = weight_bytes_rule(model, None, {name: "Q8_0" for name in names})
    sizes = measure_model(model, config, torch.float32, AutoMapParams(max_seq_len=1), rule)
    assert sizes.layer_bytes == (int(LINEAR_WEIGHTS * 34 / 32) + NORMS + KV_PER_TOKEN,
                                 LINEAR_WEIGHTS * 4 + NORMS + KV_PER_TOKEN)


def test_vision_params_reserve_room_for_the_images(tiny_dir):
    model, config = _meta_model(tiny_dir)
    rule = weight_bytes_rule(model, None, None)
    text = measure_model(model, config, torch.float32, AutoMapParams(), rule)
    vision = measure_model(model, config, torch.float32, AutoMapParams(max_num_images=2, max_image_length=140), rule)
    # 2 images of 10 x 10 patches: attention over 100 positions, 4 heads, float32
    assert vision.non_layer_bytes - text.non_layer_bytes == 2 * 100 ** 2 * 4 * 4
    assert vision.layer_bytes == text.layer_bytes


def test_the_measured_model_is_placed_and_the_plan_logged(tiny_dir, caplog):
    model, config = _meta_model(tiny_dir)
    params = AutoMapParams(max_seq_len=128)
    sizes = measure_model(model, config, torch.float32, params, weight_bytes_rule(model, None, None))
    room = sizes.non_layer_bytes + sizes.activation_bytes + sizes.layer_bytes[0] + sizes.layer_bytes[1] // 2
    with caplog.at_level(logging.INFO, logger="mistralrs.worker.auto_device_map"):
        placed = auto_placement(model, config, torch.float32, META, params, [(META, room)], None, None)
    assert placed.layers == (META, CPU) and placed.main == META
    lines = [r.getMessage() for r in caplog.records if r.name == "mistralrs.worker.auto_device_map"]
    assert lines[0].startswith("automatic device map for max_seq_len 128 x max_batch_size 1 (2 layers)")
    assert lines[1].startswith("  meta: layer 0 (") and lines[2].startswith("  cpu: layer 1 (")
    assert auto_placement(model, config, torch.float32, META, params, [(META, 10 * room)], None, None) is None


@dataclasses.dataclass
class _PlanningSpec:
    """A DeviceMapSpec that plans automatically on a main device the CPU can hold (meta stands in for a GPU)."""

    main: torch.device
    auto_map: AutoMapParams

    def resolve(self, num_layers: int) -> None:
        return None

    def plans_automatically(self) -> bool:
        return True


def test_load_model_measures_plans_and_places_before_loading(tiny_dir, monkeypatch):
    from mistralrs.loader import safetensors_loader
    model, config = _meta_model(tiny_dir)
    params = AutoMapParams(max_seq_len=128)
    sizes = measure_model(model, config, torch.float32, params, weight_bytes_rule(model, None, None))
    room = sizes.non_layer_bytes + sizes.activation_bytes + sizes.layer_bytes[0] + sizes.layer_bytes[1] // 2
    monkeypatch.setattr(safetensors_loader, "gpu_free_memory", lambda main: [(main, room)])
    files = sorted(str(p) for p in tiny_dir.glob("*.safetensors"))
    loaded = safetensors_loader.load_model(
        json.loads((tiny_dir / "config.json").read_text()), safetensors_loader.iter_safetensors(files, torch.float32),
        dtype=torch.float32, device=META, device_map=_PlanningSpec(META, params))
    assert loaded.device_map.layers == (META, CPU) and loaded.device_map.kv_tokens == 128
    checkpoint = dict(safetensors_loader.iter_safetensors(files, torch.float32))
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, checkpoint["model.layers.1.mlp.down_proj.weight"])
    assert loaded.model.layers[0].mlp.down_proj.weight.is_meta


def test_a_spread_automatic_map_sizes_the_default_kv_cache_to_its_planned_tokens():
    from types import SimpleNamespace

    from mistralrs.engine.builder import EngineConfig, num_kv_blocks
    loaded = SimpleNamespace(model=SimpleNamespace(device_map=DeviceMap(META, (META, CPU), kv_tokens=1000)),
                             max_model_len=4096, device=CPU)
    assert num_kv_blocks(EngineConfig(max_seqs=4, block_size=32), loaded, 1024) == 32        # ceil(1000 / 32)
    assert num_kv_blocks(EngineConfig(max_seqs=4, block_size=32, pa_ctxt_len=64), loaded, 1024) == 2
    shorter = SimpleNamespace(**{**vars(loaded), "max_model_len": 320})
    assert num_kv_blocks(EngineConfig(max_seqs=1, block_size=32), shorter, 1024) == 10       # one full context
    loaded.model.device_map = DeviceMap(META, (META, CPU))                                   # a manual map
    assert num_kv_blocks(EngineConfig(max_seqs=4, block_size=32), loaded, 2**20) == 256     # the CPU default


def test_only_a_cuda_model_without_a_manual_map_plans():
    params = AutoMapParams()
    assert DeviceMapSpec(GPU0, auto_map=params).plans_automatically()
    assert not DeviceMapSpec(CPU, auto_map=params).plans_automatically()
    assert not DeviceMapSpec(GPU0).plans_automatically()
    assert not DeviceMapSpec(GPU0, num_device_layers=("4",), auto_map=params).plans_automatically()
    assert not DeviceMapSpec(GPU0, Topology.from_dict({0: {"device": "cpu"}}), auto_map=params
                             ).plans_automatically()
    assert DeviceMapSpec(GPU0, Topology.from_dict({0: {"isq": "Q4K"}}), auto_map=params).plans_automatically()


# ---- the API ---------------------------------------------------------------------------------------------------

def test_a_cpu_runner_reads_auto_map_params_and_says_where_the_layers_run(tiny_dir, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    which = Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32, auto_map_params=TextAutoMapParams())
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="mistralrs.loader.pipeline"):
        warnings.simplefilter("error")
        Runner(which, show_progress=False).close()
    said = [r.getMessage() for r in caplog.records if "auto_map_params" in r.getMessage()]
    assert said == ["Which.Plain: auto_map_params plan a map over CUDA devices; the model runs on cpu, every layer "
                    "on cpu"]


def test_an_adapter_model_is_never_planned():
    from mistralrs.loader.pipeline import _device_map_spec
    from mistralrs.loader.spec import AdapterKind, AdapterSpec, LoadKind, LoadSpec
    spec = LoadSpec(LoadKind.PLAIN, "Which.Plain", "M", device=GPU0, auto_map=AutoMapParams(max_seq_len=64))
    assert _device_map_spec(spec).plans_automatically()
    assert _device_map_spec(dataclasses.replace(spec, auto_map=None)).auto_map == AutoMapParams()
    lora = dataclasses.replace(spec, label="Which.Lora", adapters=AdapterSpec(AdapterKind.LORA, "A", "o.json"))
    assert not _device_map_spec(lora).plans_automatically()


# ---- on a GPU --------------------------------------------------------------------------------------------------

def _greedy(runner: Runner) -> tuple[str, list[float]]:
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "map my layers"}], model="tiny", max_tokens=8, temperature=0.0,
        logprobs=True))
    runner.close()
    choice = response.choices[0]
    return choice.message.content, [entry.logprob for entry in choice.logprobs.content]


@needs_cuda
def test_a_model_larger_than_the_free_gpu_memory_spills_and_generates_as_on_the_cpu(tiny_dir, monkeypatch):
    which = Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        on_cpu = _greedy(Runner(which, show_progress=False))
    params = AutoMapParams(max_seq_len=32768, max_batch_size=8)   # layers of ~64 MiB each (their KV room)
    model, config = _meta_model(tiny_dir)
    sizes = measure_model(model, config, torch.float32, params, weight_bytes_rule(model, None, None))
    room = sizes.non_layer_bytes + sizes.activation_bytes + sizes.layer_bytes[0] + sizes.layer_bytes[1] // 2
    torch.cuda.empty_cache()
    blocker = torch.empty(torch.cuda.mem_get_info()[0] - room, dtype=torch.uint8, device="cuda")
    try:
        runner = Runner(Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32, auto_map_params=TextAutoMapParams(
            max_seq_len=params.max_seq_len, max_batch_size=params.max_batch_size)), show_progress=False)
        layers = runner.llm_engine._loaded.model.model.layers
        assert [next(layer.parameters()).device.type for layer in layers] == ["cuda", "cpu"]
        text, logprobs = _greedy(runner)
    finally:
        del blocker
    assert text == on_cpu[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(on_cpu[1]), atol=1e-3, rtol=0)
