"""AnyMoE end to end (REFERENCE §8.10): a tiny random base plus two fine-tuned experts that recite their own text;
gates trained on a dataset that routes prompts by topic send held-out prompts to the right expert, alone, packed
together and in chunks; the saved gates reload without training and route the same; the loss CSV falls; ISQ
quantizes the experts after training."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs.adapters.anymoe import anymoe_layers
from mistralrs.quant.isq import IsqLinearMethod
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.adapters.anymoe_fixtures import TOPICS, chat_prompt, make_anymoe_world, topic_prompts
from tests.loading import load_which

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

LR, EPOCHS = 0.05, 30
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_anymoe_world(tmp_path_factory.mktemp("anymoe"))


def _config(world, **overrides) -> AnyMoeConfig:
    fields = dict(hidden_size=64, dataset_json=str(world["dataset"]), prefix="model.layers", mlp="mlp",
                  model_ids=[str(world["expert1"]), str(world["expert2"])], expert_type=AnyMoeExpertType.FineTuned(),
                  lr=LR, epochs=EPOCHS, batch_size=4)
    fields.update(overrides)
    return AnyMoeConfig(**fields)


def _which(world) -> Which:
    return Which.Plain(model_id=str(world["base"]), dtype=ModelDType.F32)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A Runner whose gates were trained at load, the gates saved and the losses written."""
    out = tmp_path_factory.mktemp("trained")
    config = _config(world, gate_model_id=str(out / "gates"), loss_csv_path=str(out / "loss.csv"))
    runner = Runner(_which(world), anymoe_config=config)
    yield runner, out
    runner.close()


def _held_out() -> list[tuple[str, int]]:
    seen = {prompt for prompt, _ in topic_prompts(8, seed=11)}
    return [(prompt, expert) for prompt, expert in topic_prompts(3, seed=99) if prompt not in seen]


def _chat(runner: Runner, prompts: list[str]) -> list[str]:
    """Greedy answers, all submitted before any is awaited (so the engine batches them)."""
    submissions = [runner.submit_chat_completion(ChatCompletionRequest(
        messages=[{"role": "user", "content": p}], model="tiny", max_tokens=MAX_TOKENS, temperature=0.0))
        for p in prompts]
    return [runner.llm_engine.wait(s).choices[0].message.content for s in submissions]


def test_the_loss_csv_falls(trained):
    _, out = trained
    rows = list(csv.reader((out / "loss.csv").open()))
    assert rows[0] == ["Step", "Gating layer 0", "Gating layer 1"]
    steps = rows[1:]
    assert len(steps) == EPOCHS * 6 and steps[0][0] == "Step 0"   # 24 rows in batches of 4
    for layer in (1, 2):
        first = sum(float(row[layer]) for row in steps[:6]) / 6
        last = sum(float(row[layer]) for row in steps[-6:]) / 6
        assert last < first - 0.1, (layer, first, last)


def test_the_gates_are_saved_under_the_reference_keys(trained):
    _, out = trained
    tensors = load_file(out / "gates" / "gate.safetensors")
    assert sorted(tensors) == ["moe_gate.0.bias", "moe_gate.0.weight", "moe_gate.1.bias", "moe_gate.1.weight"]
    assert tensors["moe_gate.0.weight"].shape == (3, 64) and tensors["moe_gate.1.bias"].shape == (3,)


def test_held_out_prompts_get_their_experts_text(trained, world):
    runner, _ = trained
    held_out = _held_out()
    answers = _chat(runner, [prompt for prompt, _ in held_out])
    base = Runner(_which(world))
    try:
        base_answers = _chat(base, [prompt for prompt, expert in held_out if expert == 0])
    finally:
        base.close()
    for (prompt, expert), answer in zip(held_out, answers):
        if expert == 0:   # the base MLP everywhere: the base model's own answer
            assert answer == base_answers.pop(0), prompt
        else:
            assert answer == TOPICS[expert][1], (prompt, expert, answer)


def test_prefix_caching_is_off(trained, world):
    """A cached block's K/V would depend on the routing of another prompt (see mistralrs/adapters/anymoe.py)."""
    runner, _ = trained
    prompt, expert = next((p, e) for p, e in _held_out() if e != 0)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": prompt}], model="tiny",
                                    max_tokens=MAX_TOKENS, temperature=0.0)
    answers = [runner.send_chat_completion_request(request) for _ in range(2)]
    assert [a.choices[0].message.content for a in answers] == [TOPICS[expert][1]] * 2
    assert answers[1].usage.prompt_tokens > 32 and answers[1].usage.cached_prompt_tokens == 0
    base = Runner(_which(world))
    try:
        again = [base.send_chat_completion_request(request) for _ in range(2)][1]
    finally:
        base.close()
    assert again.usage.cached_prompt_tokens > 0   # a plain model reuses the first block


def _routing_steps(loaded, prompts: list[list[int]], chunk: int, decode_steps: int = 2) -> list[list[tuple]]:
    """Runs `prompts` packed in one batch, at most `chunk` prompt tokens per sequence and step, each sequence
    decoding (a fixed token) once its prompt is done, until all have decoded `decode_steps` tokens; per step,
    every AnyMoE layer's routing."""
    block, per_seq = 8, 16
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), per_seq * len(prompts), block, loaded.dtype, loaded.device)
    layers, steps = anymoe_layers(loaded.model), []
    done = [0] * len(prompts)
    while min(d - len(ids) for d, ids in zip(done, prompts)) < decode_steps:
        chunks = []
        for i, ids in enumerate(prompts):
            tokens = ids[done[i]:done[i] + chunk] if done[i] < len(ids) else [5]
            chunks.append(SeqChunk(tokens, done[i], list(range(i * per_seq, (i + 1) * per_seq)), len(ids)))
            done[i] += len(tokens)
        batch = ForwardBatch.build(chunks, block, kv, loaded.device)
        with torch.inference_mode(), batch.active():
            loaded.model(batch.input_ids, batch.positions, batch)
        steps.append([layer.last_routing for layer in layers])
    return steps


def test_saved_gates_reload_without_training_and_route_alike(trained, world, tmp_path):
    _, out = trained
    config = _config(world, gate_model_id=str(out / "gates"), training=False, dataset_json=str(tmp_path / "none"),
                     loss_csv_path=str(tmp_path / "unused.csv"))
    loaded = load_which(_which(world), anymoe_config=config)
    assert not (tmp_path / "unused.csv").exists()   # no training
    saved = load_file(out / "gates" / "gate.safetensors")
    for layer in anymoe_layers(loaded.model):
        assert torch.equal(layer.gate.weight, saved[f"moe_gate.{layer.layer_idx}.weight"])
    held_out = _held_out()
    ids = [loaded.tokenizer.tokenizer.encode(chat_prompt(p), add_special_tokens=False).ids for p, _ in held_out]
    expected = tuple(expert for _, expert in held_out)
    whole = _routing_steps(loaded, ids, chunk=max(len(i) for i in ids))
    assert len(whole) == 3 and whole[0] == [expected, expected]   # packed, each prompt routed to its topic's expert
    assert whole[1] == whole[2] == whole[0]   # decoding keeps each prompt's expert
    chunked = _routing_steps(loaded, ids, chunk=8)
    assert len(chunked) > 5 and chunked[-1] == chunked[-2] == [expected, expected]   # decided on the whole prompt


def test_chunked_prefill_keeps_the_experts_text(trained, world):
    _, out = trained
    config = _config(world, gate_model_id=str(out / "gates"), training=False)
    runner = Runner(_which(world), anymoe_config=config, prompt_chunksize=8)
    try:
        held_out = [(p, e) for p, e in _held_out() if e != 0]
        answers = _chat(runner, [prompt for prompt, _ in held_out])
    finally:
        runner.close()
    assert answers == [TOPICS[expert][1] for _, expert in held_out]


def test_isq_quantizes_the_experts_after_training(world, tmp_path):
    config = _config(world, epochs=2, gate_model_id=str(tmp_path / "gates"))
    loaded = load_which(_which(world), anymoe_config=config, in_situ_quant="Q8_0")
    assert (tmp_path / "gates" / "gate.safetensors").exists()
    layers = anymoe_layers(loaded.model)
    assert len(layers) == 2 and all(layer.num_experts == 3 for layer in layers)
    for layer in layers:
        for expert in layer.experts:
            assert isinstance(expert.down_proj.quant_method, IsqLinearMethod)
        assert layer.gate.weight.dtype == torch.float32   # the gates stay as trained
