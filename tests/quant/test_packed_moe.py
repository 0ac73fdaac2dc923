"""`PackedMoEMethod`, the expert method GGUF and ISQ share: projections packed as they arrive, and its "reference"
backend (token by token) agreeing with the grouped one for both."""

from __future__ import annotations

import pytest
import torch

from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.gguf_moe import GGUFMoEMethod
from mistralrs.quant.isq_moe import IsqMoEMethod
from mistralrs.quant.isq_types import parse_isq_type
from mistralrs.quant.packed import BlockTiledWeight, DenseWeight, PackedWeight
from mistralrs.quant.quantize import quantize_ggml

NUM_EXPERTS, HIDDEN, INTERMEDIATE = 4, 64, 32
SHAPES = {"w1": (INTERMEDIATE, HIDDEN), "w3": (INTERMEDIATE, HIDDEN), "w2": (HIDDEN, INTERMEDIATE)}


def empty_moe(method) -> FusedMoE:
    return FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, hidden_act="silu", routing="softmax_renorm",
                    checkpoint_names=("w1", "w3", "w2"), dtype=torch.float32, device="cpu", quant_method=method,
                    prefix="experts")


def expert_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{e}.{name}.weight": 0.2 * torch.randn(shape, generator=gen)
            for e in range(NUM_EXPERTS) for name, shape in SHAPES.items()}


def loaded_moe(kind: str) -> FusedMoE:
    """Q8_0 experts: GGUF blocks, or ISQ quantizing the dense checkpoint on arrival."""
    if kind == "gguf":
        moe = empty_moe(GGUFMoEMethod())
        for name, weight in expert_weights().items():
            moe.load_weight(name, quantize_ggml(weight, "Q8_0"))
    else:
        moe = empty_moe(IsqMoEMethod(parse_isq_type("Q8_0")))
        for name, weight in expert_weights().items():
            moe.load_weight(name, weight)
    return moe


class RowCounter(PackedWeight):
    """A packed weight that records how many rows each product gets."""

    def __init__(self, inner: PackedWeight, rows: list[int]):
        self.inner, self.rows, self.out_features = inner, rows, inner.out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.inner.matmul(x)


def test_gguf_projections_pack_as_they_arrive():
    moe = empty_moe(GGUFMoEMethod())
    method = moe.quant_method
    weights = expert_weights()
    moe.load_weight("0.w1.weight", quantize_ggml(weights["0.w1.weight"], "Q8_0"))
    moe.load_weight("0.w2.weight", quantize_ggml(weights["0.w2.weight"], "Q8_0"))
    assert method.w13[0] == [] and [type(w) for w in method.w2[0]] == [BlockTiledWeight]
    moe.load_weight("0.w3.weight", quantize_ggml(weights["0.w3.weight"], "Q8_0"))
    assert [w.out_features for w in method.w13[0]] == [2 * INTERMEDIATE]  # gate and up as one weight
    moe.load_weight("1.w1.weight", quantize_ggml(weights["1.w1.weight"], "Q8_0"))
    moe.load_weight("1.w3.weight", weights["1.w3.weight"])  # a dense up: its own weight after the gate's
    assert [type(w) for w in method.w13[1]] == [BlockTiledWeight, DenseWeight]
    assert method._pending[0] == {} and method._pending[1] == {}


@pytest.mark.parametrize("kind", ["gguf", "isq"])
def test_reference_backend_goes_token_by_token_and_agrees_with_grouped(kind):
    moe = loaded_moe(kind)
    gen = torch.Generator().manual_seed(1)
    x, logits = torch.randn(7, HIDDEN, generator=gen), torch.randn(7, NUM_EXPERTS, generator=gen)
    outs, rows = {}, {}
    method = moe.quant_method
    plain_w13 = method.w13
    for backend in ("fused", "reference"):
        rows[backend] = []
        method.w13 = [[RowCounter(w, rows[backend]) for w in weights] for weights in plain_w13]
        moe.set_backend(backend)
        outs[backend] = moe(x, logits)
    assert set(rows["reference"]) == {1} and len(rows["reference"]) == 7 * 2  # one row per (token, slot)
    assert sum(rows["fused"]) == 7 * 2 and len(rows["fused"]) <= NUM_EXPERTS
    torch.testing.assert_close(outs["reference"], outs["fused"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gguf", "isq"])
def test_a_misshapen_or_missing_expert_is_named(kind):
    moe = empty_moe(GGUFMoEMethod() if kind == "gguf" else IsqMoEMethod(None))
    with pytest.raises(ValueError, match=r"experts\.0\.gate: weight has shape \(3, 64\), expected \(32, 64\)"):
        moe.load_weight("0.w1.weight", torch.zeros(3, HIDDEN))
    with pytest.raises(ValueError, match="weights of expert"):
        moe(torch.zeros(1, HIDDEN), torch.zeros(1, NUM_EXPERTS))
