"""Tiny random FLUX checkpoints built with diffusers and transformers (the oracles), saved in the diffusers layout."""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

WORDS = ("a", "lighthouse", "at", "dawn", "red", "cat", "on", "the", "moon", "sky")
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE over single letters; the end-of-text token has the highest id (pooled there, as in CLIP)."""
    vocab = {}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokens with `</s>` appended, `<pad>` = 0 (T5's special ids)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_pipeline(guidance: bool, seed: int = 0) -> FluxPipeline:
    """A diffusers FluxPipeline of tiny random components (schnell-style, or dev-style with `guidance`)."""
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=52, eos_token_id=2, pad_token_id=53))
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.37, shift_factor=0.11,
                        use_post_quant_conv=not guidance, use_quant_conv=not guidance)
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    for module in (clip, t5, transformer, vae):
        module.eval()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def save_pipeline(pipe: FluxPipeline, path) -> str:
    """Writes `pipe` in the diffusers layout (safetensors) and returns the directory."""
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
