"""Manual device mapping (REFERENCE §5 topology `device`, §8.13 `num_device_layers`): mistralrs/worker/device_map.py.

On the CPU: how the settings resolve to a device per layer (CUDA counts faked where a map needs them), that the
placement step creates every weight of a placed layer on its device and nothing of it on the main device (a
"device" the CPU can hold: meta), that a ForwardBatch moves all of its tensors, and that a CPU model accepts the
settings that name only the CPU. The split forward runs under fake tensors with meta as the second device (every op
that mixes devices raises there, as on CUDA), dense and GGUF. Where CUDA exists, a model split between CUDA and the
CPU generates what the same model generates on one device.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import transformers

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs.loader.pipeline import _without_topology
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.topology import Topology
from mistralrs.worker.device_map import DeviceMap, DeviceMapSpec
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec, SeqChunk, allocate_kv_caches
from tests.tiny_models import make_tiny_model_dir

CPU, META = torch.device("cpu"), torch.device("meta")
CUDA = [torch.device("cuda", i) for i in range(2)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretends the machine has two CUDA devices (only the map's arithmetic runs under it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _topology(text: str) -> Topology:
    import yaml
    return Topology.from_dict(yaml.safe_load(text))


def test_num_device_layers_on_a_cuda_model(two_gpus):
    def layers(values, num_layers=4, topology=None):
        resolved = DeviceMapSpec(CUDA[0], topology, tuple(values)).resolve(num_layers)
        return None if resolved is None else list(resolved.layers)

    assert layers(["2"]) == [CUDA[0], CUDA[0], CPU, CPU]
    assert layers(["0:1", "1:2"]) == [CUDA[0], CUDA[1], CUDA[1], CPU]
    assert layers(["1:1", "0:1"]) == [CUDA[1], CUDA[0], CPU, CPU]   # runs in the order given
    assert layers(["500"]) is None                                    # every layer on the model's device
    assert layers(["0"]) == [CPU] * 4
    # the topology's device entries override the counts for the layers they cover
    assert layers(["4"], topology=_topology("1-3: {device: cpu}\n3: {device: 'cuda[1]'}")) == \
        [CUDA[0], CPU, CPU, CUDA[1]]
    assert layers(["0"], topology=_topology("0-4: {device: 'cuda[0]'}")) is None
    with pytest.raises(ValueError, match="num_device_layers: CUDA ordinal 2 does not exist"):
        layers(["2:1"])


@pytest.mark.parametrize("values, message", [
    (["0:8", "x"], "'x' must be a layer count"),
    (["8", "0:4"], "'8' must be a layer count 'N' \\(alone\\)"),
    (["0:4", "0:4"], "each CUDA ordinal may appear once"),
    (["-1"], "'-1' must be"),
])
def test_malformed_num_device_layers_name_the_field(values, message):
    with pytest.raises(ValueError, match=f"num_device_layers: {message}"):
        DeviceMapSpec(CPU, None, tuple(values))


def test_a_cpu_model_ignores_num_device_layers_like_the_reference():
    assert DeviceMapSpec(CPU, None, ("500",)).resolve(4) is None
    assert DeviceMapSpec(CPU, None, ("0:2", "1:2")).resolve(4) is None   # the reference panics on this one
    assert DeviceMapSpec(CPU, _topology("0-2: {device: cpu}"), None).resolve(4) is None


def test_adapter_models_refuse_a_topology_naming_another_device(two_gpus):
    spec = DeviceMapSpec(CPU, _topology("0: {device: 'cuda[0]', isq: Q4K}"), None)
    with pytest.raises(ValueError, match=r"Which.Lora: adapters need every decoder layer.*cuda:0"):
        _without_topology(spec, "Which.Lora")
    assert _without_topology(DeviceMapSpec(CPU, _topology("0: {isq: Q4K}"), None), "Which.Lora").topology is None


def _tiny_llama_gguf(tmp_path) -> list[str]:
    """A tiny random Llama written as a Q8_0 GGUF file under `tmp_path`; its path(s)."""
    from tests.loader.gguf_fixtures import write_tiny_gguf
    from tests.tiny_models import hf_config

    config = hf_config("llama", 320)
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    return write_tiny_gguf(hf, config, tmp_path / "tiny.gguf", arch="llama", ggml_type="Q8_0")


def _batch(device=CPU) -> ForwardBatch:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4)
    caches = allocate_kv_caches(spec, 4, 8, torch.float32, device)
    chunks = [SeqChunk([1, 2, 3], 0, [2]), SeqChunk([4], 5, [0])]
    return ForwardBatch.build(chunks, 8, caches, device)


def test_forward_batch_on_another_device_moves_every_tensor_once():
    fb = _batch()
    fb.adapter_weights = torch.ones(fb.num_tokens, 2)
    moved = fb.on(META)
    for field in dataclasses.fields(fb):
        value = getattr(fb, field.name)
        if field.init and isinstance(value, torch.Tensor):
            assert getattr(moved, field.name).device == META, field.name
            assert getattr(moved, field.name).shape == value.shape, field.name
    assert moved.kv_caches is fb.kv_caches
    assert moved.query_start_locs == fb.query_start_locs and moved.block_tables == fb.block_tables
    assert fb.on(META) is moved
    assert fb.on(CPU) is fb


def test_kv_caches_follow_the_layer_devices():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4)
    caches = allocate_kv_caches(spec, 2, 8, torch.float32, [CPU, META])
    assert [k.device for k, _ in caches] == [CPU, META] and [v.device for _, v in caches] == [CPU, META]
    with pytest.raises(ValueError, match="3 devices given for 2 layers"):
        allocate_kv_caches(spec, 2, 8, torch.float32, [CPU] * 3)


@dataclasses.dataclass
class _FixedMap:
    """A spec resolving to a given map (a device the CPU can hold, meta, stands in for a second device)."""

    device_map: DeviceMap

    def resolve(self, num_layers: int) -> DeviceMap:
        return self.device_map

    def plans_automatically(self) -> bool:
        return False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-map-llama")
    make_tiny_model_dir(path, "llama")
    return path


def test_a_placed_layer_is_created_and_loaded_only_on_its_device(tiny_dir):
    import json
    config = json.loads((tiny_dir / "config.json").read_text())
    files = sorted(str(p) for p in tiny_dir.glob("*.safetensors"))
    device_map = DeviceMap(CPU, (CPU, META))
    model = load_model(config, iter_safetensors(files, torch.float32), dtype=torch.float32, device=CPU,
                       device_map=_FixedMap(device_map))
    placed = {name for name, _ in model.model.layers[1].named_parameters()}
    assert placed and all(p.device == META for p in model.model.layers[1].parameters())
    on_main = [name for name, p in model.named_parameters() if not name.startswith("model.layers.1.")]
    assert all(model.get_parameter(name).device == CPU for name in on_main)
    assert model.device_map is device_map
    assert device_map.describe() == "layer 0: cpu, layer 1: meta"


def test_layer_hooks_hand_every_layer_its_inputs_and_leave_the_result_unchanged(tiny_dir, monkeypatch):
    from tests.models.family_harness import TinyRunner, prompt

    import json
    config = json.loads((tiny_dir / "config.json").read_text())
    files = sorted(str(p) for p in tiny_dir.glob("*.safetensors"))
    model = load_model(config, iter_safetensors(files, torch.float32), dtype=torch.float32, device=CPU)
    token_ids = [t % 90 for t in prompt(3, 12)]   # within the character vocabulary
    (before,) = TinyRunner(model).step([(0, token_ids)])
    placed_batches = []
    on = ForwardBatch.on
    monkeypatch.setattr(ForwardBatch, "on", lambda fb, device: placed_batches.append(device) or on(fb, device))
    DeviceMap(CPU, (CPU, CPU)).install_hooks(model)
    (after,) = TinyRunner(model).step([(0, token_ids)])
    assert placed_batches == [CPU, CPU]          # one per decoder layer, each given its own device
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("placement", [(META, CPU), (CPU, META)], ids=["first-elsewhere", "last-elsewhere"])
def test_a_split_forward_runs_every_op_on_one_device(tiny_dir, placement):
    """The whole load and forward (prefill of two sequences, then a decode step) under fake tensors, with meta
    standing in for a second device: a fake tensor op that mixes devices raises, as a CUDA op would. (Meta cannot
    be the model's device here: quantized and dense weights are built on meta before placement.)"""
    import json

    from torch._subclasses.fake_tensor import FakeTensorMode

    from mistralrs.worker.device_map import layer_devices

    config = json.loads((tiny_dir / "config.json").read_text())
    files = sorted(str(p) for p in tiny_dir.glob("*.safetensors"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    weights = [(name, mode.from_tensor(t)) for name, t in iter_safetensors(files, torch.float32)]
    with mode:
        model = load_model(config, weights, dtype=torch.float32, device=CPU,
                           device_map=_FixedMap(DeviceMap(CPU, placement)))
        assert [next(layer.parameters()).device for layer in model.model.layers] == list(placement)
        caches = allocate_kv_caches(model.kv_cache_spec(), 8, 4, torch.float32, layer_devices(model, 2, CPU))
        assert [k.device for k, _ in caches] == list(placement)
        prefill = ForwardBatch.build([SeqChunk(list(range(10)), 0, [0, 1, 2]), SeqChunk([3, 4], 0, [4])], 4,
                                     caches, CPU)
        hidden = model(prefill.input_ids, prefill.positions, prefill)
        logits = model.compute_logits(hidden[prefill.last_token_indices])
        decode = ForwardBatch.build([SeqChunk([5], 10, [0, 1, 2])], 4, caches, CPU)
        decoded = model(decode.input_ids, decode.positions, decode)
    assert (hidden.device, logits.device, decoded.device) == (CPU, CPU, CPU)
    assert logits.shape == (2, config["vocab_size"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_split_gguf_forward_runs_every_op_on_one_device(tmp_path, dtype):
    """As above for GGUF Q8_0 blocks: the stand-in device's layer is packed there; the CPU layer (bfloat16: the int8
    dot-product form, which under FakeTensorMode only propagates shapes) on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mistralrs.loader.gguf_loader import open_gguf
    from mistralrs.quant.ggml_tensor import GGMLTensor
    from mistralrs.quant.gguf_moe import GGUFModelQuantConfig
    from mistralrs.worker.device_map import layer_devices
    gguf = open_gguf(_tiny_llama_gguf(tmp_path))
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(tensor):
        if isinstance(tensor, GGMLTensor):
            return tensor.with_rows(mode.from_tensor(tensor.data.clone()))
        return mode.from_tensor(tensor)

    weights = [(name, fake(t)) for name, t in gguf.iter_weights(dtype, keep_quantized=True)]
    with mode:
        model = load_model(gguf.config, weights, dtype=dtype, device=CPU,
                           device_map=_FixedMap(DeviceMap(CPU, (META, CPU))), quant_config=GGUFModelQuantConfig())
        caches = allocate_kv_caches(model.kv_cache_spec(), 8, 4, dtype, layer_devices(model, 2, CPU))
        batch = ForwardBatch.build([SeqChunk(list(range(10)), 0, [0, 1, 2])], 4, caches, CPU)
        logits = model.compute_logits(model(batch.input_ids, batch.positions, batch))
    assert logits.device == CPU
    assert all(t.device == META for t in _tensors(model.model.layers[0].self_attn.o_proj.quant_method))
    assert all(t.device == CPU for t in _tensors(model.model.layers[1].self_attn.o_proj.quant_method))


def test_the_main_device_kv_budget_pays_only_for_its_own_layers(tiny_dir):
    import json

    from mistralrs.engine.builder import main_device_bytes_per_block
    from mistralrs.loader.pipeline import LoadedModel

    config = json.loads((tiny_dir / "config.json").read_text())
    files = sorted(str(p) for p in tiny_dir.glob("*.safetensors"))
    model = load_model(config, iter_safetensors(files, torch.float32), dtype=torch.float32, device=CPU)
    loaded = LoadedModel(model, None, "tiny", 512, torch.float32, CPU)
    whole = model.kv_cache_spec().bytes_per_block(8, torch.float32)
    assert main_device_bytes_per_block(loaded, 8) == whole
    model.device_map = DeviceMap(CPU, (CPU, META))
    assert main_device_bytes_per_block(loaded, 8) == whole // 2


def _greedy(runner: Runner) -> tuple[str, list[float]]:
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "map my layers"}], model="tiny", max_tokens=8, temperature=0.0,
        logprobs=True))
    choice = response.choices[0]
    runner.close()
    return choice.message.content, [entry.logprob for entry in choice.logprobs.content]


def test_a_cpu_model_runs_with_settings_that_name_only_the_cpu(tiny_dir, tmp_path):
    topology = tmp_path / "topology.yml"
    topology.write_text("0-1: {device: cpu}\n")
    which = Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32, topology=str(topology))
    plain = _greedy(Runner(Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32), show_progress=False))
    if torch.cuda.is_available():
        pytest.skip("the model's device is CUDA here (covered by the CUDA tests below)")
    text, logprobs = _greedy(Runner(which, num_device_layers=["1"], show_progress=False))
    # The engine's thread chooser may pick another thread count for either run on a busy machine, which moves
    # float32 sums in the last bits.
    assert text == plain[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(plain[1]), atol=1e-5, rtol=0)


def test_gguf_topology_accepts_devices_and_refuses_isq(tmp_path):
    files = _tiny_llama_gguf(tmp_path)
    topology = tmp_path / "topology.yml"
    topology.write_text("0: {device: cpu, isq: Q4K}\n")
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=os.path.basename(files[0]),
                       dtype=ModelDType.F32, topology=str(topology))
    with pytest.raises(ValueError, match="Which.GGUF: topology .* has `isq` entries"):
        Runner(which, show_progress=False)
    topology.write_text("0: {device: cpu}\n")
    Runner(which, show_progress=False).close()


def test_ggml_refuses_a_manual_map(tmp_path):
    which = Which.GGML(quantized_model_id=str(tmp_path), quantized_filename="x.bin", tok_model_id=str(tmp_path))
    with pytest.raises(ValueError, match="Which.GGML: a manual device map"):
        Runner(which, num_device_layers=["1"], show_progress=False)


@needs_cuda
@pytest.mark.parametrize("settings", [dict(num_device_layers=["1"]), dict(topology="0: {device: cpu}\n")])
def test_layers_split_between_cuda_and_cpu_generate_as_on_one_device(tiny_dir, tmp_path, settings):
    which = Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32)
    on_cuda = _greedy(Runner(which, show_progress=False))
    kwargs = {}
    if "topology" in settings:
        (tmp_path / "t.yml").write_text(settings["topology"])
        which = dataclasses.replace(which, topology=str(tmp_path / "t.yml"))
    else:
        kwargs["num_device_layers"] = settings["num_device_layers"]
    runner = Runner(which, show_progress=False, **kwargs)
    model = runner.llm_engine._loaded.model
    expected = [CPU, CUDA[0]] if "topology" in settings else [CUDA[0], CPU]
    assert [next(layer.parameters()).device for layer in model.model.layers] == expected
    assert [k.device.type for k, _ in runner.llm_engine._engine.model_runner.kv_caches] == [d.type for d in expected]
    assert model.lm_head.weight.device.type == "cuda"
    text, logprobs = _greedy(runner)
    assert text == on_cuda[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(on_cuda[1]), atol=1e-4, rtol=0)


def _tensors(obj, depth: int = 0):
    """Every tensor an object holds, through lists and attributes (quant methods keep theirs outside the
    state dict)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, dict)):
        for item in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors(item, depth)
    elif hasattr(obj, "__dict__") and depth < 4:
        for value in vars(obj).values():
            yield from _tensors(value, depth + 1)


@needs_cuda
def test_a_gguf_model_keeps_its_cpu_layers_quantized_on_the_cpu(tmp_path):
    files = _tiny_llama_gguf(tmp_path)
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=os.path.basename(files[0]),
                       dtype=ModelDType.F32)
    on_cuda = _greedy(Runner(which, show_progress=False))
    runner = Runner(which, num_device_layers=["1"], show_progress=False)
    layer = runner.llm_engine._loaded.model.model.layers[1]
    held = list(_tensors([m.quant_method for m in layer.modules() if hasattr(m, "quant_method")]))
    assert held and all(t.device == CPU for t in held)
    assert all(t.device.type == "cuda" for t in _tensors(runner.llm_engine._loaded.model.model.layers[0].self_attn.o_proj))
    text, logprobs = _greedy(runner)
    assert text == on_cuda[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(on_cuda[1]), atol=1e-3, rtol=0)
