"""AnyMoE at load time (REFERENCE §8.10): experts read from other checkpoints, gates trained or read back.

`check_anymoe(spec, config, arch)` runs before the base model's weights are read: the architecture must be one
AnyMoE supports (`adapters/anymoe.SUPPORTED_ARCHITECTURES`), `hidden_size` the model's, and with `training` the
dataset is read and checked (`read_dataset`). `apply_anymoe` then, on the loaded base:
- builds experts 1..n of every selected layer from `model_ids`: fine-tuned checkpoints of the same architecture
  (the tensors under `<prefix>.<layer>.<mlp>.`), or LoRA adapters (`<prefix>.<layer>.<mlp>.<target>.lora_A/B`,
  PEFT's `base_model.model.` in front accepted) merged into copies of the base MLP with scale alpha / rank;
- installs an `AnyMoeMlp` per selected layer (mistralrs/adapters/anymoe.py);
- trains the gates (`train_gates`), or with `training=False` reads them from `<gate_model_id>/gate.safetensors`.

Training follows the reference: one AdamW per gating layer (lr, betas 0.9/0.999, eps 1e-8, no weight decay), only
the gates train; each epoch the rows are shuffled (a fixed seed, so a load is reproducible) and cut into batches of
`batch_size` prompts, each prompt rendered with the chat template as one user message with the generation prompt
(raw text when the model has none); each step runs the batch as one packed prefill and takes, per gating layer,
`cross_entropy(sequence-averaged gate output, expert label)`. As in the reference the gate output is the softmax,
so the loss applies a second softmax and cannot fall below log(1 + (n - 1) / e) for n experts. The gates are then
saved to `<gate_model_id>/gate.safetensors` (keys `moe_gate.<layer>.weight/bias`, float32) when an id is given,
and the per-step losses written to `loss_csv_path` (`Step, Gating layer 0, ...`). ISQ, if asked, runs afterwards
(mistralrs/loader/pipeline.py).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mistralrs.adapters.anymoe import (
    SUPPORTED_ARCHITECTURES, AnyMoeMlp, find_mlps, fine_tuned_expert, gate_tensors, install, load_gate_tensors,
    lora_expert,
)
from mistralrs.loader.chat_template import ChatTemplate
from mistralrs.loader.source import ModelSource
from mistralrs.loader.spec import AnyMoeSpec
from mistralrs.loader.tokenizer import TokenizerBundle
from mistralrs.models.registry import hf_architecture_of, model_class_for
from mistralrs.worker.device_map import layer_devices
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches

logger = logging.getLogger(__name__)

GATE_FILENAME = "gate.safetensors"
_BLOCK_SIZE = 16  # tokens per block of the training steps' scratch KV cache
_SHUFFLE_SEED = 0  # the dataset order of every epoch follows from it


@dataclass(frozen=True)
class TrainingRow:
    """One row of the AnyMoE dataset."""

    prompt: str  # the user message
    expert: int  # the expert it should route to (0: the base MLP, i: model_ids[i - 1])


def read_dataset(path: str, num_experts: int) -> list[TrainingRow]:
    """The rows of `{"rows": [{"prompt", "expert", "image_urls"?}]}` at `path`; ValueError naming
    `anymoe_config.dataset_json` for a missing or malformed file, an expert out of range, or images (text models
    only)."""
    field = "anymoe_config.dataset_json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{field}: no such file: {path!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{field}: {path!r} is not a readable JSON file ({exc})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{field}: {path!r} must hold {{\"rows\": [...]}} with at least one row")
    parsed = []
    for i, row in enumerate(rows):
        where = f"{field}: rows[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{where} needs a non-empty string 'prompt', got {row!r}")
        expert = row.get("expert")
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
            raise ValueError(f"{where}.expert is {expert!r}: it must be an int in 0..{num_experts - 1} (0 is the "
                             f"base MLP, 1..{num_experts - 1} the model_ids)")
        if row.get("image_urls"):
            raise ValueError(f"{where}.image_urls: images need a vision model; this is a text model")
        parsed.append(TrainingRow(row["prompt"], expert))
    return parsed


def check_anymoe(spec: AnyMoeSpec, config: dict, arch: str | None) -> list[TrainingRow] | None:
    """Checks what can be checked before the base weights load (architecture, hidden size, the dataset) and
    returns the dataset's rows (None when the gates are read from `gate_model_id` instead of trained)."""
    architecture = hf_architecture_of(model_class_for(config.get("architectures"), arch))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"anymoe_config: AnyMoE does not support {architecture} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    if config.get("hidden_size") != spec.hidden_size:
        raise ValueError(f"anymoe_config.hidden_size is {spec.hidden_size}, but the model's hidden_size is "
                         f"{config.get('hidden_size')}")
    return read_dataset(spec.dataset_json, len(spec.model_ids) + 1) if spec.training else None


def _mlp_tensors(model_id: str, token: str | None, spec: AnyMoeSpec, layers: Sequence[int],
                 dtype: torch.dtype) -> tuple[ModelSource, dict[int, dict[str, torch.Tensor]]]:
    """The tensors under `<prefix>.<layer>.<mlp>.` of `model_id`'s safetensors files for each of `layers` (names
    relative to the MLP; a leading PEFT `base_model.model.` dropped), floating ones cast to `dtype`."""
    source = ModelSource(model_id, token=token)
    files = sorted(f for f in source.list_files() if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"anymoe_config.model_ids: {model_id!r} has no .safetensors weights")
    found: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    head = f"{spec.prefix}."
    for filename in files:
        with safe_open(source.get(filename), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                name = key.removeprefix("base_model.model.")
                if not name.startswith(head):
                    continue
                index, _, rest = name[len(head):].partition(".")
                if not index.isdigit() or int(index) not in found or not rest.startswith(f"{spec.mlp}."):
                    continue
                tensor = f.get_tensor(key)
                found[int(index)][rest[len(spec.mlp) + 1:]] = tensor.to(dtype) if tensor.is_floating_point() \
                    else tensor
    return source, found


def _same_architecture(source: ModelSource, base: nn.Module) -> None:
    """ValueError when a fine-tuned expert's config.json names another architecture than the base model's."""
    path = source.maybe_get("config.json")
    if path is None:
        return
    with open(path, encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    expected = hf_architecture_of(type(base))
    if architectures and architectures != [expected]:
        raise ValueError(f"anymoe_config.model_ids: {source.model_id!r} is a {architectures[0]}, the base model a "
                         f"{expected}; fine-tuned experts must share the base model's architecture")


def _lora_deltas(tensors: dict[str, torch.Tensor], spec: AnyMoeSpec, where: str) -> dict[str, tuple]:
    """target module -> (lora_A, lora_B) of one layer of an adapter, checked against `spec.lora.rank`."""
    deltas = {}
    for target in spec.lora.target_modules:
        a, b = tensors.get(f"{target}.lora_A.weight"), tensors.get(f"{target}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{where}: no {target}.lora_A.weight / {target}.lora_B.weight "
                             "(anymoe_config.expert_type.target_modules)")
        if a.shape[0] != spec.lora.rank or b.shape[1] != spec.lora.rank:
            raise ValueError(f"anymoe_config.expert_type.rank is {spec.lora.rank}, but {where} {target} has rank "
                             f"{a.shape[0]}")
        deltas[target] = (a, b)
    return deltas


def build_experts(model: nn.Module, spec: AnyMoeSpec, token: str | None,
                  dtype: torch.dtype) -> dict[int, list[nn.Module]]:
    """Experts 1..n of every selected decoder layer (layer -> experts in `model_ids` order)."""
    mlps = dict(find_mlps(model, spec.prefix, spec.mlp, spec.layers))
    experts: dict[int, list[nn.Module]] = {layer: [] for layer in mlps}
    for number, model_id in enumerate(spec.model_ids, start=1):
        source, tensors = _mlp_tensors(model_id, token, spec, list(mlps), dtype)
        if spec.lora is None:
            _same_architecture(source, model)
        for layer, base in mlps.items():
            path = f"{spec.prefix}.{layer}.{spec.mlp}.experts.{number}"
            where = f"anymoe_config.model_ids[{number - 1}] {model_id!r} layer {layer}"
            if spec.lora is None:
                experts[layer].append(fine_tuned_expert(model, base, tensors[layer], path, where))
            else:
                deltas = _lora_deltas(tensors[layer], spec, where)
                experts[layer].append(lora_expert(model, base, deltas, spec.lora.alpha / spec.lora.rank, path,
                                                  where))
    return experts


def _prompt_ids(tokenizer: TokenizerBundle, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user message through the chat template with the generation prompt (BOS in front when the
    tokenizer adds one and the template did not), or as raw text when the model has no template."""
    encoder = tokenizer.tokenizer
    if tokenizer.chat_template is None:
        return [encoder.encode(p, add_special_tokens=True).ids for p in prompts]
    template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                            unk_token=tokenizer.unk_token)
    bos_id = encoder.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    ids = []
    for prompt in prompts:
        text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        row = encoder.encode(text, add_special_tokens=False).ids
        ids.append([bos_id, *row] if tokenizer.add_bos_token and bos_id is not None and row[:1] != [bos_id] else row)
    return ids


def _train_step(model: nn.Module, layers: list[AnyMoeMlp], optimizers: list[torch.optim.Optimizer],
                prompts: list[list[int]], labels: list[int], kv_caches: list, device: torch.device) -> list[float]:
    """One packed prefill of `prompts` and one AdamW step per gating layer; the losses, per layer."""
    chunks, next_block = [], 0
    for ids in prompts:
        blocks = -(-len(ids) // _BLOCK_SIZE)
        chunks.append(SeqChunk(ids, 0, list(range(next_block, next_block + blocks)), len(ids)))
        next_block += blocks
    batch = ForwardBatch.build(chunks, _BLOCK_SIZE, kv_caches, device)
    with torch.no_grad(), batch.active():
        model(batch.input_ids, batch.positions, batch)
    losses = []
    for layer, optimizer in zip(layers, optimizers):
        output = layer.gate_output
        loss = F.cross_entropy(output, torch.tensor(labels, device=output.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_gates(model: nn.Module, layers: list[AnyMoeMlp], rows: list[TrainingRow], prompt_ids: list[list[int]],
                spec: AnyMoeSpec, *, dtype: torch.dtype, device: torch.device) -> list[list[float]]:
    """Trains the gates of `layers` on `rows` (see the module docstring); the losses of every step, per layer."""
    optimizers = [torch.optim.AdamW(layer.gate.parameters(), lr=spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0) for layer in layers]
    longest = sorted((-(-len(ids) // _BLOCK_SIZE) for ids in prompt_ids), reverse=True)
    kv_spec = model.kv_cache_spec()
    kv_caches = allocate_kv_caches(kv_spec, sum(longest[:spec.batch_size]), _BLOCK_SIZE, dtype,
                                   layer_devices(model, kv_spec.num_layers, device))
    order, shuffle = list(range(len(rows))), random.Random(_SHUFFLE_SEED)
    losses = []
    for layer in layers:
        layer.start_training()
    try:
        for _ in range(spec.epochs):
            shuffle.shuffle(order)
            for i in range(0, len(order), spec.batch_size):
                picked = order[i:i + spec.batch_size]
                losses.append(_train_step(model, layers, optimizers, [prompt_ids[j] for j in picked],
                                          [rows[j].expert for j in picked], kv_caches, device))
    finally:
        for layer in layers:
            layer.finish_training()
    return losses


def write_loss_csv(path: str, losses: list[list[float]]) -> None:
    """The reference's loss file: a `Step, Gating layer 0, ...` header, then `Step i` and each layer's loss."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Step", *(f"Gating layer {i}" for i in range(len(losses[0]) if losses else 0))])
        for step, row in enumerate(losses):
            writer.writerow([f"Step {step}", *(f"{loss:.4f}" for loss in row)])


def _read_gates(layers: list[AnyMoeMlp], gate_model_id: str, token: str | None) -> None:
    path = ModelSource(gate_model_id, token=token).get(GATE_FILENAME)
    load_gate_tensors(layers, load_file(path), f"anymoe_config.gate_model_id {gate_model_id!r} ({GATE_FILENAME})")
    logger.info("AnyMoE: loaded %d gating layers from %s", len(layers), path)


def apply_anymoe(model: nn.Module, tokenizer: TokenizerBundle, spec: AnyMoeSpec, rows: list[TrainingRow] | None, *,
                 token: str | None, dtype: torch.dtype, device: torch.device, max_len: int) -> list[AnyMoeMlp]:
    """Turns the loaded base `model` into the AnyMoE model `spec` describes (experts, gates trained on `rows` or
    read from `gate_model_id`); returns its AnyMoE layers."""
    layers = install(model, spec.prefix, spec.mlp, build_experts(model, spec, token, dtype), spec.hidden_size)
    if not spec.training:
        _read_gates(layers, spec.gate_model_id, token)
        return layers
    prompt_ids = _prompt_ids(tokenizer, [row.prompt for row in rows])
    for i, ids in enumerate(prompt_ids):
        if len(ids) > max_len:
            raise ValueError(f"anymoe_config.dataset_json: rows[{i}].prompt is {len(ids)} tokens, more than the "
                             f"model's context of {max_len}")
    losses = train_gates(model, layers, rows, prompt_ids, spec, dtype=dtype, device=device)
    logger.info("AnyMoE: trained %d gating layers over %d experts in %d steps; final losses %s", len(layers),
                layers[0].num_experts, len(losses), [round(x, 4) for x in losses[-1]] if losses else [])
    if spec.gate_model_id is not None:
        os.makedirs(spec.gate_model_id, exist_ok=True)
        save_file(gate_tensors(layers), os.path.join(spec.gate_model_id, GATE_FILENAME))
    if spec.loss_csv_path is not None:
        write_loss_csv(spec.loss_csv_path, losses)
    return layers
