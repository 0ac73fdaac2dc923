"""LoRA on Mixtral's experts (`block_sparse_moe.experts.{e}.w1/w3/w2`, the per-expert PEFT layout of Mixtral
fine-tunes made with transformers 4.x), held in our stacked `FusedMoE`.

Oracle, independent of our code and of peft (transformers 5 fuses the experts into 3-D parameters, which peft's
`target_modules` cannot wrap): the adapter files are written here by hand, and the expected logits come from
transformers' MixtralForCausalLM with every delta `B @ A * scale` added by hand into its weights (`q_proj`, and
`experts.gate_up_proj[e]` = [gate (w1) rows; up (w3) rows], `experts.down_proj[e]` = w2).

X-LoRA over expert adapters: peft's XLoraModel cannot wrap these experts, so only a classifier with zero weights
is checked (its scalings are softmax(bias), per LoRA layer, whatever the hidden state): the oracle then merges
each module's delta times its layer's scaling by hand. A classifier that reads the hidden state is checked
against peft on linear layers only (tests/adapters/test_xlora.py, test_lora_families.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mistralrs import ModelDType, Which
from mistralrs.adapters import LoraState, activate_adapters
from mistralrs.adapters.moe_lora import ExpertTarget, hook_expert
from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.layers.moe import FusedMoE, MoEMethodBase
from mistralrs.worker.options import ExecutionOptions, apply_execution_options
from tests.adapters.adapter_fixtures import (
    assert_close,
    hf_base,
    packed_logits,
    peft_logits,
    scheduled,
    write_config_base,
    write_ordering,
)
from tests.loading import load_which
from tests.models import family_harness as harness

from tests.models import test_mixtral

TOKENS = list(range(3, 60, 3))
OTHER = [7, 9, 44, 2, 5, 61, 30, 30, 12]
SETS = [(), ("a1",), ("a2",), ("a1", "a2")]
MOE = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}"
SPECS = {  # name -> (seed, r, lora_alpha, use_rslora, module targets, experts adapted)
    "a1": (11, 4, 8, False, ["q_proj", "w1", "w2", "w3"], range(6)),
    "a2": (12, 2, 6, True, ["w3", "w2"], [0, 2, 3, 5]),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _shapes(config, proj: str) -> tuple[int, int]:
    """(in, out) of a Mixtral projection."""
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, h), "w1": (h, i), "w3": (h, i), "w2": (i, h)}[proj]


def _make_adapter(config, seed: int, rank: int, targets: list[str], experts) -> dict[str, tuple]:
    """HF module name -> (A [r, in], B [out, r]), random and large enough that a missed delta shows."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(config.num_hidden_layers):
        for proj in targets:
            names = [f"model.layers.{layer}.self_attn.{proj}"] if proj == "q_proj" else \
                [MOE.format(layer=layer, expert=e, proj=proj) for e in experts]
            fan_in, fan_out = _shapes(config, proj)
            for name in names:
                weights[name] = (torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in),
                                 0.5 * torch.randn(fan_out, rank, generator=gen))
    return weights


def _scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _write_adapter(folder, weights: dict, rank: int, alpha: float, rslora: bool, targets: list[str]) -> None:
    folder.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, adapters folder, working folder, {name: (weights, scale)})."""
    root = tmp_path_factory.mktemp("moe_lora")
    base, adapters = root / "base", root / "adapters"
    config = transformers.MixtralConfig(**test_mixtral.TINY)
    write_config_base(base, config, prepare=lambda m: harness.sharpen(m, seed=5))
    made = {}
    for name, (seed, rank, alpha, rslora, targets, experts) in SPECS.items():
        weights = _make_adapter(config, seed, rank, targets, experts)
        _write_adapter(adapters / name, weights, rank, alpha, rslora, targets)
        made[name] = (weights, _scale(rank, alpha, rslora))
    return base, adapters, root, made


def _oracle(setup, names, experts: bool = True, module_weight=None):
    """transformers' Mixtral with the named adapters' deltas merged by hand (expert deltas only when `experts`),
    each times `module_weight(adapter index, module)` when given."""
    base, _, _, made = setup
    model = hf_base(base)
    i = model.config.intermediate_size
    with torch.no_grad():
        for j, name in enumerate(names):
            weights, scale = made[name]
            for module, (a, b) in weights.items():
                delta = (b @ a) * scale * (1.0 if module_weight is None else module_weight(j, module))
                parts = module.split(".")
                layer = model.model.layers[int(parts[2])]
                if parts[3] == "self_attn":
                    getattr(layer.self_attn, parts[4]).weight += delta
                elif experts:
                    expert, proj = int(parts[5]), parts[6]
                    moe = layer.mlp.experts
                    if proj == "w2":
                        moe.down_proj[expert] += delta
                    else:
                        moe.gate_up_proj[expert, (0 if proj == "w1" else i):][:i] += delta
    return model


def _expected(setup, names, tokens=TOKENS) -> torch.Tensor:
    return peft_logits(_oracle(setup, names), tokens)


def _plain_logits(loaded, tokens=TOKENS) -> torch.Tensor:
    return packed_logits(loaded, [tokens], lambda b: loaded.model(b.input_ids, b.positions, b))[0]


def _which(setup, file: str, **ordering) -> Which.Lora:
    base, adapters, root, _ = setup
    return Which.Lora(adapters_model_id=str(adapters), order=write_ordering(root / file, base, **ordering),
                      dtype=ModelDType.F32)


def _preloaded(setup):
    preload = [{"name": n, "adapter_model_id": str(setup[1])} for n in ("a1", "a2")]
    return load_which(_which(setup, "preloaded.json", order=["a1"], preload_adapters=preload),
                         show_progress=False)


def test_oracle_expert_deltas_matter(setup):
    both = _expected(setup, ["a1", "a2"])
    attention_only = peft_logits(_oracle(setup, ["a1", "a2"], experts=False), TOKENS)
    assert (both - attention_only).abs().max().item() > 1e-1
    assert (_expected(setup, ["a2"]) - _expected(setup, [])).abs().max().item() > 1e-1   # a2: experts only


def test_merged_at_load_matches_oracle(setup):
    loaded = load_which(_which(setup, "merged.json", order=["a1", "a2"]), show_progress=False)
    assert all(not m.adapters for m in loaded.model.modules() if isinstance(m, FusedMoE))   # merged, not hooked
    assert_close(_plain_logits(loaded), _expected(setup, ["a1", "a2"]))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_preloaded_and_switched_match_oracle(setup, backend):
    loaded = _preloaded(setup)
    apply_execution_options(loaded.model, ExecutionOptions(moe_backend=backend))
    assert_close(_plain_logits(loaded), _expected(setup, ["a1"]))
    for active in (["a2"], ["a1", "a2"], []):
        activate_adapters(loaded.model, active)
        assert_close(_plain_logits(loaded), _expected(setup, active))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_per_request_sets_in_one_packed_step_match_oracle(setup, backend):
    loaded = _preloaded(setup)
    apply_execution_options(loaded.model, ExecutionOptions(moe_backend=backend))
    runtime = adapter_runtime_of(loaded.model)
    chunks = [TOKENS, OTHER, TOKENS[::-1], OTHER + TOKENS[:5]]
    ours = packed_logits(loaded, chunks, lambda b: runtime.forward(loaded.model, b, [None] * 4, SETS))
    for tokens, names, got in zip(chunks, SETS, ours):
        assert_close(got, _expected(setup, names, tokens))


def test_expert_only_adapter_is_switchable(setup):
    """An adapter set touching no Linear (a2: experts only) still gives the model a LoRA state."""
    preload = [{"name": "a2", "adapter_model_id": str(setup[1])}]
    loaded = load_which(_which(setup, "a2.json", order=["a2"], preload_adapters=preload), show_progress=False)
    assert_close(_plain_logits(loaded), _expected(setup, ["a2"]))
    activate_adapters(loaded.model, [])
    assert_close(_plain_logits(loaded), _expected(setup, []))


def _bad_adapter(setup, name: str, a: torch.Tensor, b: torch.Tensor, module: str, rank: int):
    _write_adapter(setup[1] / name, {module: (a, b)}, rank, 4, False, [module.rsplit(".", 1)[-1]])
    return _which(setup, f"{name}.json", order=[name])


@pytest.mark.parametrize("case, pattern", [
    ("rank", r"'model.layers.0.block_sparse_moe.experts.1.w1' has rank mismatch"),
    ("shape", r"'model.layers.0.block_sparse_moe.experts.1.w2' shape mismatch.*takes 96 and gives 64"),
    ("expert", r"'model.layers.0.block_sparse_moe.experts.6.w3' is not a linear layer"),
])
def test_bad_expert_adapters_are_refused_by_name(setup, case, pattern):
    module = {"rank": MOE.format(layer=0, expert=1, proj="w1"), "shape": MOE.format(layer=0, expert=1, proj="w2"),
              "expert": MOE.format(layer=0, expert=6, proj="w3")}[case]
    a, b = torch.randn(2, 64), torch.randn(96, 2)
    if case == "rank":
        b = torch.randn(96, 3)
    which = _bad_adapter(setup, f"bad_{case}", a, b, module, 2)
    with pytest.raises(ValueError, match=pattern):
        load_which(which, show_progress=False)


class _OpaqueExperts(MoEMethodBase):
    """Experts stored in a form the adapters cannot reach (as a quantized method without adapter support)."""

    def create_weights(self, layer, dtype, device) -> None:
        return None


def test_separate_adapter_on_experts_without_support_is_refused():
    moe = FusedMoE(4, 2, 8, 12, hidden_act="silu", routing="softmax_renorm", checkpoint_names=("w1", "w3", "w2"),
                   dtype=torch.float32, device="cpu", prefix="experts", quant_method=_OpaqueExperts())
    adapter = type("A", (), {"name": "x", "scale": 1.0, "weights": {"experts.0.w1": (torch.ones(2, 8),
                                                                                      torch.ones(12, 2))}})()
    with pytest.raises(ValueError, match=r"'experts.0.w1'.*not supported on _OpaqueExperts"):
        hook_expert(adapter, "experts.0.w1", ExpertTarget(moe, 0, "gate"), state=None, layer_index=0)


def test_quantizing_experts_that_hold_adapters_is_refused():
    """A quant method swapped in after the adapters were hooked (ISQ after loading) must not drop them silently."""
    moe = FusedMoE(4, 2, 8, 12, hidden_act="silu", routing="softmax_renorm", checkpoint_names=("w1", "w3", "w2"),
                   dtype=torch.float32, device="cpu", prefix="experts")
    state = LoraState(["x"])
    adapter = type("A", (), {"name": "x", "scale": 1.0, "weights": {"experts.0.w1": (torch.ones(2, 8),
                                                                                      torch.ones(12, 2))}})()
    hook_expert(adapter, "experts.0.w1", ExpertTarget(moe, 0, "gate"), state, 0)
    with pytest.raises(ValueError, match=r"experts: holds separately loaded expert adapters.*_OpaqueExperts"):
        moe.set_quant_method(_OpaqueExperts())


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_xlora_with_constant_layerwise_scalings_matches_oracle(setup, backend):
    """Layerwise X-LoRA over a1, a2 whose classifier has zero weights: every token's scalings are
    softmax(bias) per LoRA layer; the LoRA layers are numbered by the ordering file's `layers` (shuffled)."""
    base, adapters, root, made = setup
    names = ["a1", "a2"]
    modules = sorted({m for n in names for m in made[n][0]})
    layers = {m: int(k) for m, k in zip(modules, torch.randperm(len(modules), generator=torch.Generator()
                                                                  .manual_seed(3)))}
    scalings = torch.softmax(1.5 * torch.randn(len(modules), 2, generator=torch.Generator().manual_seed(4)), -1)
    repo = root / f"xlora_{backend}"
    repo.mkdir()
    save_file({"last.weight": torch.zeros(2 * len(modules), 64), "last.bias": scalings.log().reshape(-1)},
              str(repo / "xlora_classifier.safetensors"))
    (repo / "xlora_config.json").write_text(json.dumps({
        "hidden_size": 64, "adapters": names, "layerwise_scalings": True, "xlora_depth": 1, "base_model_id": str(base),
        "scaling_pass_value": 0.0}))
    for name in names:
        (repo / name).mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (repo / name / file).write_bytes((adapters / name / file).read_bytes())
    order = write_ordering(root / f"xlora_{backend}.json", base, order=names, layers=layers)
    loaded = load_which(Which.XLora(xlora_model_id=str(repo), order=order, dtype=ModelDType.F32),
                        show_progress=False)
    apply_execution_options(loaded.model, ExecutionOptions(moe_backend=backend))
    runtime = adapter_runtime_of(loaded.model)
    oracle = _oracle(setup, names, module_weight=lambda j, m: float(scalings[layers[m], j]))
    ours = packed_logits(loaded, [TOKENS, OTHER],
                         lambda b: runtime.forward(loaded.model, b, scheduled([0, 1]), [None, None]))
    for tokens, got in zip([TOKENS, OTHER], ours):
        assert_close(got, peft_logits(oracle, tokens))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_preloaded_adapters_on_isq_experts(setup, backend):
    """Experts quantized in situ (Q8_0) keep their adapters separate: the adapters' effect is the oracle's, within
    Q8_0's error (much smaller than the effect itself)."""
    loaded = load_which(_which(setup, "preloaded_isq.json", order=["a1"], preload_adapters=[
        {"name": n, "adapter_model_id": str(setup[1])} for n in ("a1", "a2")]), in_situ_quant="Q8_0",
        show_progress=False)
    moe = next(m for m in loaded.model.modules() if isinstance(m, FusedMoE))
    assert type(moe.quant_method).__name__ == "IsqMoEMethod" and moe.adapters
    apply_execution_options(loaded.model, ExecutionOptions(moe_backend=backend))
    for active in (["a1", "a2"], ["a2"]):
        activate_adapters(loaded.model, active)
        got, want, without = _plain_logits(loaded), _expected(setup, active), _expected(setup, [])
        assert float((got - want).norm() / want.norm()) < 0.05 < float((without - want).norm() / want.norm())


def test_preloaded_adapters_on_gguf_experts(setup):
    """A Mixtral GGUF (Q8_0 experts kept as blocks, `Which.LoraGGUF`) with expert adapters held separately."""
    import json

    from safetensors.torch import load_file

    from tests.loader.gguf_fixtures import write_converted_gguf

    base, adapters, root, _ = setup
    checkpoint = {}
    for path in sorted(base.glob("*.safetensors")):
        checkpoint.update(load_file(str(path)))
    config = json.loads((base / "config.json").read_text())
    (root / "gguf").mkdir(exist_ok=True)
    write_converted_gguf(checkpoint, config, root / "gguf" / "m.gguf", "Q8_0")
    order = write_ordering(root / "gguf.json", base, order=["a1", "a2"])
    loaded = load_which(Which.LoraGGUF(quantized_model_id=str(root / "gguf"), quantized_filename="m.gguf",
                                          tok_model_id=str(base), adapters_model_id=str(adapters), order=order,
                                          dtype=ModelDType.F32), show_progress=False)
    moe = next(m for m in loaded.model.modules() if isinstance(m, FusedMoE))
    assert type(moe.quant_method).__name__ == "GGUFMoEMethod" and moe.adapters
    got, want, without = _plain_logits(loaded), _expected(setup, ["a1", "a2"]), _expected(setup, [])
    assert float((got - want).norm() / want.norm()) < 0.05 < float((without - want).norm() / want.norm())
