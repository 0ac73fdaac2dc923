"""AnyMoE on every text family the reference supports it for (REFERENCE §8.10): the MLPs are found by name in
each family's decoder layers and fine-tuned experts are read through the family's fused-projection table. With a
gate that always picks one expert, the AnyMoE model equals a plain model carrying that expert's MLPs: expert 0
the base itself, expert 1 the fine-tuned checkpoint (all layers, or only the `layers` selected). LoRA-adapter
experts equal the base with the adapter merged (peft). The fused C++ decoder layer stays off AnyMoE layers."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, ModelDType, Which
from mistralrs.adapters.anymoe import anymoe_layers
from mistralrs.layers.fused_decode import attach_fused_decode, fused_twin
from tests.adapters.adapter_fixtures import (
    assert_close, hf_base, packed_logits, peft_logits, peft_lora_model, write_config_base, write_lora_adapters,
)
from tests.loading import load_which
from tests.models import family_harness as harness
from tests.models import test_gemma, test_phi2, test_phi3, test_starcoder2
from tests.tiny_models import hf_config

TOKENS = list(range(3, 60, 3))
GEMMA_NORMS = {"norm_center": 0.0, "embed_std": 0.15 / 8}


def _gemma(name: str):
    config_cls, _, _, overrides = test_gemma.FAMILIES[name]
    return config_cls(**test_gemma.TINY, **overrides)


FAMILIES = {  # name -> (config factory, `harness.sharpen` arguments)
    "llama": (lambda: hf_config("llama", harness.VOCAB_SIZE), {}),
    "mistral": (lambda: hf_config("mistral", harness.VOCAB_SIZE), {}),
    "qwen2": (lambda: hf_config("qwen2", harness.VOCAB_SIZE), {}),
    "gemma": (lambda: _gemma("gemma"), GEMMA_NORMS),
    "gemma2": (lambda: _gemma("gemma2"), GEMMA_NORMS),
    "gemma3": (lambda: _gemma("gemma3"), GEMMA_NORMS),
    "phi2": (lambda: transformers.PhiConfig(**test_phi2.TINY), {}),
    "phi3": (lambda: transformers.Phi3Config(**test_phi3.TINY, **test_phi3.CONFIGS["phi3_mini"][0]), {}),
    "starcoder2": (lambda: transformers.Starcoder2Config(**test_starcoder2.TINY), {"embed_std": 0.05}),
}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _with_mlps(base, source, path, layers: list[int] | None = None) -> None:
    """`base` (a transformers model) saved at `path` with the MLP tensors of `source` (of every layer, or of
    `layers`)."""
    state = base.state_dict()
    for name, tensor in source.state_dict().items():
        if ".mlp." in name and (layers is None or int(name.split(".")[2]) in layers):
            state[name] = tensor
    base.load_state_dict(state)
    base.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folders): `base`, `expert` (the base with other MLPs), `mixed` (the base with layer 0's MLP of the
    expert) and `root`."""
    name = request.param
    make_config, sharpen = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    write_config_base(root / "base", make_config(), prepare=lambda m: harness.sharpen(m, seed=5, **sharpen))
    expert = hf_base(root / "base")
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param_name, param in expert.named_parameters():
            if ".mlp." in param_name:
                param.add_(0.15 * torch.randn(param.shape, generator=gen))
    expert.save_pretrained(root / "expert", safe_serialization=True)
    _with_mlps(hf_base(root / "base"), expert, root / "mixed", layers=[0])
    return name, {"base": root / "base", "expert": root / "expert", "mixed": root / "mixed", "root": root}


def _forced_gates(path, layers: list[int], hidden: int, num_experts: int, expert: int) -> str:
    """A gate.safetensors whose gates always pick `expert`."""
    tensors = {}
    for layer in layers:
        tensors[f"moe_gate.{layer}.weight"] = torch.zeros(num_experts, hidden)
        tensors[f"moe_gate.{layer}.bias"] = torch.nn.functional.one_hot(torch.tensor(expert), num_experts) * 10.0
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "gate.safetensors"))
    return str(path)


def _run_active(loaded):
    def run(batch):
        with batch.active():
            return loaded.model(batch.input_ids, batch.positions, batch)
    return run


def _logits(loaded, chunks=(TOKENS,)) -> list[torch.Tensor]:
    return packed_logits(loaded, list(chunks), _run_active(loaded))


def _plain(path) -> torch.Tensor:
    """A plain model's logits (the tokenizer of the base beside it)."""
    which = Which.Plain(model_id=str(path), dtype=ModelDType.F32,
                        tokenizer_json=str(path.parent / "base" / "tokenizer.json"))
    return _logits(load_which(which, show_progress=False))[0]


def _anymoe(paths, expert_type, model_ids, gates, layers=()):
    config = transformers.AutoConfig.from_pretrained(paths["base"])
    anymoe = AnyMoeConfig(hidden_size=config.hidden_size, dataset_json="unused.json", prefix="model.layers",
                          mlp="mlp", model_ids=model_ids, expert_type=expert_type, layers=list(layers),
                          gate_model_id=gates, training=False)
    return load_which(Which.Plain(model_id=str(paths["base"]), dtype=ModelDType.F32), anymoe_config=anymoe,
                      show_progress=False)


@pytest.mark.parametrize("expert", [0, 1])
def test_a_gate_that_picks_one_expert_gives_that_experts_model(family, expert):
    _, paths = family
    config = transformers.AutoConfig.from_pretrained(paths["base"])
    every = list(range(config.num_hidden_layers))
    loaded = _anymoe(paths, AnyMoeExpertType.FineTuned(), [str(paths["expert"])],
                     _forced_gates(paths["root"] / f"all{expert}", every, config.hidden_size, 2, expert))
    layers = anymoe_layers(loaded.model)
    assert [layer.layer_idx for layer in layers] == every
    got = _logits(loaded, [TOKENS, TOKENS[::-1]])
    assert [layer.last_routing for layer in layers] == [(expert, expert)] * len(every)
    want = _plain(paths["expert"] if expert else paths["base"])
    assert (_plain(paths["expert"]) - _plain(paths["base"])).abs().max().item() > 1e-1   # the experts differ
    assert_close(got[0], want)


def test_layers_selects_the_decoder_layers(family):
    _, paths = family
    hidden = transformers.AutoConfig.from_pretrained(paths["base"]).hidden_size
    loaded = _anymoe(paths, AnyMoeExpertType.FineTuned(), [str(paths["expert"])],
                     _forced_gates(paths["root"] / "layer0", [0], hidden, 2, 1), layers=[0])
    assert [layer.layer_idx for layer in anymoe_layers(loaded.model)] == [0]
    assert_close(_logits(loaded)[0], _plain(paths["mixed"]))
    attach_fused_decode(loaded.model, True)   # what the model runner does: no twin over a replaced MLP
    decoder_layers = loaded.model.model.layers
    assert fused_twin(decoder_layers[0]) is None
    if callable(getattr(type(decoder_layers[1]), "decoder_layout", None)):
        assert fused_twin(decoder_layers[1]) is not None
    assert_close(_logits(loaded)[0], _plain(paths["mixed"]))


LORA_TARGETS = {"llama": ["gate_proj", "down_proj"], "mistral": ["up_proj"], "qwen2": ["gate_proj", "up_proj"],
                "gemma": ["down_proj"], "gemma2": ["gate_proj"], "gemma3": ["up_proj", "down_proj"],
                "phi2": ["fc1", "fc2"], "phi3": ["gate_up_proj"], "starcoder2": ["c_fc"]}


def test_lora_adapter_experts_equal_the_merged_adapter(family):
    name, paths = family
    targets = LORA_TARGETS[name]
    write_lora_adapters(paths["base"], paths["root"] / "adapters",
                        {"a": (3, dict(r=4, lora_alpha=6, target_modules=targets))}, scale_b=3.0)
    config = transformers.AutoConfig.from_pretrained(paths["base"])
    expert_type = AnyMoeExpertType.LoraAdapter(rank=4, alpha=6.0, target_modules=targets)
    loaded = _anymoe(paths, expert_type, [str(paths["root"] / "adapters" / "a")],
                     _forced_gates(paths["root"] / "lora", list(range(config.num_hidden_layers)), config.hidden_size,
                                   2, 1))
    want = peft_logits(peft_lora_model(paths["base"], paths["root"] / "adapters", ["a"]), TOKENS)
    assert (want - _plain(paths["base"])).abs().max().item() > 1e-1   # the adapter matters
    assert_close(_logits(loaded)[0], want)
