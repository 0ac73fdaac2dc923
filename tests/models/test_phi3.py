"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`) over packed tokens and a paged KV cache against `transformers`.

fp32, tiny random configs; logits within `family_harness.ATOL` (1e-4) at every computed position.
LongRoPE picks its short or long factors per sequence by the larger of its prompt length and its length after
the step (see `mistralrs/layers/rotary.py`): a prompt longer than `original_max_position_embeddings` = 16 uses the
long factors in every chunk, equal to `transformers` over the whole prompt in one call, and decode steps equal
`transformers`' cached forward one token per call. Greedy decoding across the
switch is compared with `transformers`' cached forward (see `test_greedy_decode_matches_transformers`).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.models.config import TextModelConfig
from mistralrs.models.phi3 import Phi3ForCausalLM
from mistralrs.models.registry import model_class_for
from tests.models import family_harness as harness

ORIGINAL_MAX = 16
TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            original_max_position_embeddings=ORIGINAL_MAX, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            attn_implementation="eager")


def _longrope(rotary_dim: int, partial: float) -> dict:
    half = rotary_dim // 2
    return dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=ORIGINAL_MAX,
                partial_rotary_factor=partial, short_factor=[1.0 + 0.2 * i for i in range(half)],
                long_factor=[1.5 + 1.5 * i for i in range(half)])


CONFIGS = {
    # Phi-3-mini-4k style: plain RoPE, sliding window 8 < prompt on every layer.
    "phi3_mini": (dict(sliding_window=8), False),
    # Phi-3.5-mini style: LongRoPE over the whole head (head_dim 16: 8 factors), max/original = 4.
    "phi3.5_mini": (dict(rope_parameters=_longrope(16, 1.0)), True),
    # Phi-4-mini style: LongRoPE on 3/4 of each head (12 features: 6 factors), tied LM head, window 10.
    "phi4_mini": (dict(rope_parameters=_longrope(12, 0.75), partial_rotary_factor=0.75, tie_word_embeddings=True,
                       sliding_window=10), True),
}



pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    """(name, HF reference model, our model, whether the reference must be fed our chunks)."""
    name = request.param
    overrides, chunk_sensitive = CONFIGS[name]
    config = transformers.Phi3Config(**TINY, **overrides)
    hf, ours = harness.build_pair(config, transformers.Phi3ForCausalLM, str(tmp_path_factory.mktemp(name)),
                                  embed_std=0.05 if config.tie_word_embeddings else 0.15)
    assert type(ours) is Phi3ForCausalLM
    assert ours.model.rotary_emb.is_longrope == chunk_sensitive
    return name, hf, ours, chunk_sensitive


def test_whole_prompt_one_chunk(family):
    _, hf, ours, _ = family
    harness.check_one_chunk(hf, ours)


def test_chunked_prefill_then_decode(family):
    _, hf, ours, chunk_sensitive = family
    harness.check_chunked_prefill_then_decode(hf, ours, chunk_sensitive)


def test_packed_sequences_and_mixed_steps(family):
    _, hf, ours, chunk_sensitive = family
    harness.check_packed_sequences(hf, ours, chunk_sensitive)


def test_reference_backend_matches_sdpa(family):
    harness.check_reference_backend(family[2])


def test_greedy_decode_matches_transformers(family):
    """Prompts of 9 and 4 tokens and 32 new ones: LongRoPE switches to the long factors on the way.

    With LongRoPE the reference is `transformers`' forward over its cache, one token per call: at the switch
    `transformers.generate` (Phi3ForCausalLM.prepare_inputs_for_generation) drops its cache and recomputes the
    whole sequence with the long factors, which our engine (like mistral.rs) does not; the generated tokens agree
    with `generate` up to the switch, checked below.
    """
    _, hf, ours, chunk_sensitive = family
    harness.check_greedy_matches_generate(hf, ours, use_generate=not chunk_sensitive)
    if chunk_sensitive:
        prompts = harness.greedy_prompts()
        ours_tokens = harness.greedy_ours(ours, prompts, harness.NUM_GREEDY_TOKENS)
        for token_ids, tokens in zip(prompts, ours_tokens):
            before_switch = ORIGINAL_MAX - len(token_ids) + 1  # tokens sampled from contexts <= ORIGINAL_MAX
            assert tokens[:before_switch] == harness.hf_greedy(hf, token_ids, before_switch)


def test_load_rejects_missing_and_unexpected_weights(family):
    harness.check_load_errors(family[1], "model.layers.1.self_attn.qkv_proj.weight")
    harness.check_load_errors(family[1], "model.layers.0.mlp.gate_up_proj.weight")


def test_longrope_factors_and_window_matter(family):
    _, _, ours, chunk_sensitive = family
    if chunk_sensitive:
        def short_factors_only(model):
            model.model.rotary_emb.long_inv_freq.copy_(model.model.rotary_emb.inv_freq)

        assert harness.max_logit_change(ours, short_factors_only) > 1e-2
    if ours.config.sliding_window is not None:
        def no_window(model):
            for layer in model.model.layers:
                layer.self_attn.attn.sliding_window = None

        assert harness.max_logit_change(ours, no_window) > 1e-2


def test_longrope_choice_is_per_sequence():
    """In one packed step, a sequence past the original length uses the long factors and a short one the short
    factors, for every one of its tokens (not per token position)."""
    config = TextModelConfig.from_hf_dict(dict(TINY, rope_parameters=_longrope(16, 1.0)))
    rotary = Phi3ForCausalLM(config, dtype=torch.float32, device="cpu").model.rotary_emb
    positions = torch.tensor([14, 15, 16, 17, 3, 4])  # seq A: 14..17 (length 18); seq B: 3..4 (length 5)
    context_lens = torch.tensor([18, 18, 18, 18, 5, 5])
    cos, _ = rotary.cos_sin(positions, torch.float32, context_lens)
    expected_long = (positions[:4, None].float() * rotary.long_inv_freq).cos() * rotary.attention_factor
    expected_short = (positions[4:, None].float() * rotary.inv_freq).cos() * rotary.attention_factor
    torch.testing.assert_close(cos[:4, 0, :8], expected_long)
    torch.testing.assert_close(cos[4:, 0, :8], expected_short)
    assert rotary.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item() / torch.log(
        torch.tensor(16.0)).item()) ** 0.5)


def test_longrope_config_errors():
    bad = _longrope(16, 1.0)
    bad["long_factor"] = bad["long_factor"][:3]
    with pytest.raises(ValueError, match=r"rope_scaling\.long_factor must list rotary_dim // 2 = 8"):
        Phi3ForCausalLM(TextModelConfig.from_hf_dict(dict(TINY, rope_parameters=bad)), dtype=torch.float32,
                        device="cpu")
    legacy = dict(TINY, rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    config = TextModelConfig.from_hf_dict(legacy)  # "su": the pre-"longrope" name; the top-level original length
    assert config.rope_scaling["original_max_position_embeddings"] == ORIGINAL_MAX
    assert Phi3ForCausalLM(config, dtype=torch.float32, device="cpu").model.rotary_emb.is_longrope


def test_registry_names():
    assert model_class_for(["Phi3ForCausalLM"]) is Phi3ForCausalLM
    assert model_class_for(None, "Phi3") is Phi3ForCausalLM
