"""`QuantConfig`: how the linear layers of a model store and compute their weights.

`load_model` builds the model as written (every `Linear` with the dense `UnquantizedLinearMethod`, whose
storage is allocated but not yet touched) and, when given a quant config, calls `prepare(model)` before any
weight is loaded: each `Linear` gets the config's method, so model files need no quantization code (DESIGN
rule 1). Embeddings may then keep GGML blocks. A `Linear` whose weight is a `VocabEmbedding`'s Parameter (the
model tied its LM head) keeps the tie: the embedding loads its checkpoint tensor into the head as well.
"""

from __future__ import annotations

from torch import nn

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear, LinearMethodBase


class QuantConfig:
    """Chooses the quant method of every `Linear` of a model before loading (subclasses: GGUF blocks, ISQ, UQFF)."""

    def linear_method(self, layer: Linear) -> LinearMethodBase:
        """A new method for `layer` (one instance per layer; `layer.prefix` names it for per-layer rules)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Gives every `Linear` of `model` its method, keeping LM heads tied to their embeddings, and lets the
        embeddings keep GGML blocks."""
        embeddings = [m for m in model.modules() if isinstance(m, VocabEmbedding)]
        for embedding in embeddings:
            embedding.keep_quantized = True
        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            weight = module._parameters.get("weight")
            tied_to = next((e for e in embeddings if weight is not None and e.weight is weight), None)
            module.set_quant_method(self.linear_method(module))
            if tied_to is not None:
                tied_to.tie_head(module)
