"""UQFF files and an imatrix under tensor parallelism (2 gloo ranks on the CPU) give the single-process model's logits
and greedy tokens: each rank keeps its piece of every stored layer, or quantizes its shards with their columns'
importances.

Files written here by one process (`write_uqff`, ISQ of tiny random Llama and Mixtral checkpoints) and files the
reference wheel wrote (tests/fixtures/uqff: Phi-3, whose qkv/gate_up are one stored layer each, cut per part):

- Q4_0 / Q8_0 (legacy blocks): row-parallel splits on whole 32-column blocks, kept in blocks.
- Q4K: the Llama's down_proj (256 input columns, split 128 + 128) and the reference k256 file's o_proj (256 columns,
  8 heads over 2 ranks) split inside a 256-column block, so those shards are dequantized to the model dtype.
- HQQ4 / HQQ8: row-parallel shards keep whole HQQ groups; column-parallel shards are dequantized.
- FP8: one scale per tensor, every shard kept in FP8.
- Mixtral: the experts' intermediate range (gate/up rows, down columns) with a tied LM head, and MoQE (HQQ8, whose
  tied head's rows are dequantized: the embedding keeps its own table).
- DeepSeek V2 Q4_0: MLA (q_b, kv_b column-parallel, o row-parallel, the latent projections whole), a shared expert and
  routed experts.
- imatrix with Q4K: every input 512 columns wide, so each rank quantizes whole super-blocks.

Rank 0's float32 logits within 1e-4 of the one process on the same file, greedy tokens equal. Through a `Runner`
(MISTRALRS_TP_SIZE=2), a file a one-process `Runner` wrote gives that `Runner`'s tokens and logprobs.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from mistralrs import Runner
from mistralrs.api.enums import IsqOrganization, ModelDType
from mistralrs.api.which import Which
from mistralrs.distributed.group import TPGroup, building_for
from mistralrs.loader.spec import LoadKind, LoadSpec
from mistralrs.quant.imatrix import write_cimatrix
from mistralrs.quant.isq import isq_layers
from mistralrs.quant.uqff import UqffLinearMethod, UqffMoEMethod
from tests.distributed.test_tp_loader import _refused
from tests.distributed.test_runtime import NO_SPECIAL, PROMPTS, assert_same_choice, chat, tp_runner
from tests.distributed import test_tp_models as tp_models
from tests.distributed.test_tp_models import run_model
from tests.distributed.tp_harness import run_on_ranks
from tests.fixtures.uqff import make_reference_uqff as ref
from tests.loading import load_which
from tests.models import family_harness as harness
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ATOL = 1e-4
FIXTURES = os.path.dirname(os.path.abspath(ref.__file__))
COMMON = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
LLAMA = dict(COMMON, intermediate_size=256)  # Q4K's down_proj: one 256-column block per row, split in two
# Q4K everywhere (inputs of 512 columns): o_proj and down_proj split 256 + 256, one super-block per rank
LLAMA_K512 = dict(COMMON, hidden_size=512, intermediate_size=512)
MIXTRAL = dict(COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
# MLA (q_b, kv_b column-parallel, o row-parallel; the latent whole), a shared expert and routed experts
DEEPSEEK_V2 = dict(tp_models.DEEPSEEK, vocab_size=99, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
LLAMA_TYPES = ("Q4_0", "Q8_0", "Q4K", "HQQ4", "FP8")
# name -> (checkpoint, ISQ type, organization) of the files written here
WRITTEN = {**{f"llama_{isq.lower()}": ("llama", isq, None) for isq in LLAMA_TYPES},
           "mixtral_q8_0": ("mixtral", "Q8_0", None), "mixtral_moqe_hqq8": ("mixtral", "HQQ8", IsqOrganization.MoQE),
           "deepseek_v2_q4_0": ("deepseek_v2", "Q4_0", None)}
# name -> (fixture directory, file) of the reference's files
REFERENCE = {"phi3_reference_q4k": ("small", "small-q4k.uqff"), "phi3_reference_hqq4": ("small", "small-hqq4.uqff"),
             "phi3_reference_fp8": ("small", "small-fp8.uqff"), "k256_reference_q4k": ("k256", "k256-q4k.uqff")}


def _write_checkpoint(name: str, path) -> None:
    config = {"llama": lambda: transformers.LlamaConfig(**LLAMA),
              "llama_k512": lambda: transformers.LlamaConfig(**LLAMA_K512),
              "mixtral": lambda: transformers.MixtralConfig(**MIXTRAL),
              "deepseek_v2": lambda: transformers.DeepseekV2Config(**DEEPSEEK_V2)}[name]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    harness.sharpen(hf, seed=1)
    hf.save_pretrained(path)
    ref.bytelevel_char_tokenizer().save(str(path / "tokenizer.json"))


def _write_imatrix(directory) -> str:
    """A `.cimatrix` of far from uniform importances for every ISQ layer of the checkpoint in `directory`."""
    model = load_which(Which.Plain(model_id=str(directory), dtype=ModelDType.F32), device=torch.device("cpu"),
                       show_progress=False).model
    gen = torch.Generator().manual_seed(3)
    widths = [layer.module.in_features for layer in isq_layers(model) for _ in layer.names]
    path = str(directory / "importance.cimatrix")
    write_cimatrix(path, {index: torch.exp(2 * torch.randn(width, generator=gen))
                          for index, width in enumerate(widths)})
    return path


def _which(directory: str, uqff: str, organization: IsqOrganization | None) -> Which.Plain:
    extra = {} if organization is None else {"organization": organization}
    return Which.Plain(model_id=directory, from_uqff=uqff, dtype=ModelDType.F32, **extra)


def _forms(model: torch.nn.Module) -> dict[str, list[str]]:
    """Layer 0's modules read from the file -> the forms of the states this process holds ("ggml", "dense", "hqq",
    "fp8")."""
    return {layer.path.removeprefix("model.layers.0."): [state.kind for state in layer.module.quant_method.states]
            for layer in isq_layers(model) if layer.layer_index == 0
            and isinstance(layer.module.quant_method, (UqffLinearMethod, UqffMoEMethod))}


def run_cases(cases: dict[str, tuple[Which.Plain, str | None]], prompts: list[list[int]]) -> dict:
    """name -> `run_model`'s result and the forms of `_forms`, for each (selection, ISQ type)."""
    results = {}
    for name, (which, isq) in cases.items():
        loaded = load_which(which, device=torch.device("cpu"), show_progress=False, in_situ_quant=isq)
        results[name] = dict(run_model(loaded.model, prompts, torch.float32), forms=_forms(loaded.model))
    return results


def _on_rank(group: TPGroup, payload: dict) -> dict:
    with building_for(group):
        return run_cases(payload["cases"], payload["prompts"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (two-rank result, single-process result)."""
    root = tmp_path_factory.mktemp("tp_uqff")
    for checkpoint in ("llama", "mixtral", "deepseek_v2"):
        _write_checkpoint(checkpoint, root / checkpoint)
    _write_checkpoint("llama_k512", root / "llama_k512")
    cases = {"llama_q4k_imatrix": (Which.Plain(model_id=str(root / "llama_k512"), dtype=ModelDType.F32,
                                               imatrix=_write_imatrix(root / "llama_k512")), "Q4K")}
    for name, (checkpoint, isq, organization) in WRITTEN.items():
        out = root / name / f"{name}.uqff"
        extra = {} if organization is None else {"organization": organization}
        load_which(Which.Plain(model_id=str(root / checkpoint), write_uqff=str(out), dtype=ModelDType.F32, **extra),
                   device=torch.device("cpu"), show_progress=False, in_situ_quant=isq)
        cases[name] = (_which(str(out.parent), out.name, organization), None)
    for name, (directory, uqff) in REFERENCE.items():
        cases[name] = (_which(os.path.join(FIXTURES, directory), uqff, None), None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 99, (n,), generator=gen).tolist() for n in (11, 6)]
    sharded = run_on_ranks(_on_rank, dict(cases=cases, prompts=prompts))
    whole = run_cases(dict(cases, llama_q4k_no_imatrix=(Which.Plain(model_id=str(root / "llama_k512"),
                                                                    dtype=ModelDType.F32), "Q4K")), prompts)
    return {name: (sharded.get(name), whole[name]) for name in whole}


@pytest.mark.parametrize("name", [*WRITTEN, *REFERENCE, "llama_q4k_imatrix"])
def test_two_ranks_equal_one_process(runs, name):
    sharded, whole = runs[name]
    assert sharded["sharded"] and not whole["sharded"]
    assert sharded["tokens"] == whole["tokens"]
    assert len(sharded["logits"]) == len(whole["logits"])
    for ours, reference in zip(sharded["logits"], whole["logits"]):
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_write_uqff_is_refused_and_says_how_to_get_the_file():
    spec = LoadSpec(LoadKind.PLAIN, "Which.Plain", "unused", write_uqff="model.uqff")
    message = _refused(TPGroup(0, 2), spec)
    assert "write_uqff cannot be combined with tensor parallelism (2 ranks" in message
    assert "write it in one process without tensor parallelism, then load it with from_uqff" in message


# name -> layer 0's module -> the forms rank 0 holds (the one process holds the file's forms)
RANK0_FORMS = {
    "llama_q4_0": {"self_attn.qkv_proj": ["ggml"] * 3, "self_attn.o_proj": ["ggml"], "mlp.down_proj": ["ggml"]},
    # down_proj's 256 columns are one Q4_K block per row, split 128 + 128: dequantized; the 64-wide layers are Q4_1
    "llama_q4k": {"self_attn.o_proj": ["ggml"], "mlp.gate_up_proj": ["ggml"] * 2, "mlp.down_proj": ["dense"]},
    # row-parallel layers keep whole HQQ groups, column-parallel ones are dequantized
    "llama_hqq4": {"self_attn.qkv_proj": ["dense"] * 3, "self_attn.o_proj": ["hqq"], "mlp.down_proj": ["hqq"]},
    "llama_fp8": {"self_attn.qkv_proj": ["fp8"] * 3, "self_attn.o_proj": ["fp8"], "mlp.down_proj": ["fp8"]},
    # experts: per expert gate, down, up
    "mixtral_moqe_hqq8": {"block_sparse_moe.experts": ["dense", "hqq", "dense"] * 4},
    # the reference stores qkv_proj as one layer: cut per part
    "phi3_reference_q4k": {"self_attn.qkv_proj": ["ggml"] * 3, "self_attn.o_proj": ["ggml"]},
    # 8 heads of 32 over 2 ranks: o_proj's 256 columns split inside their Q4_K block
    "k256_reference_q4k": {"self_attn.qkv_proj": ["ggml"] * 3, "self_attn.o_proj": ["dense"]},
}


@pytest.mark.parametrize("name", sorted(RANK0_FORMS))
def test_each_rank_keeps_the_stored_form_where_its_split_allows(runs, name):
    sharded, whole = runs[name]
    for module, forms in RANK0_FORMS[name].items():
        assert sharded["forms"][module] == forms, module
        assert len(whole["forms"][module]) <= len(forms)  # the reference's qkv_proj: one stored layer


def test_imatrix_under_two_ranks_quantizes_each_shard_with_its_columns(runs):
    """Each rank quantizes its shards with the importances of their input columns (o_proj's and down_proj's 512
    columns: one 256-column Q4_K super-block per rank, weighted by its own statistics): the same blocks as the one
    process, whose logits the importances move."""
    sharded, whole = runs["llama_q4k_imatrix"]
    without = runs["llama_q4k_no_imatrix"][1]
    assert sharded["forms"] == {}  # ISQ, not a file
    assert (whole["logits"][0] - without["logits"][0]).abs().max() > 100 * ATOL


def test_runner_serves_a_uqff_file_under_two_ranks(tmp_path, monkeypatch):
    """Through the public API: the file a one-process `Runner` writes (ISQ Q4K), served by a `Runner` with
    MISTRALRS_TP_SIZE=2, gives the one-process `Runner`'s greedy tokens and logprobs on that file."""
    make_tiny_model_dir(tmp_path / "llama", "llama")
    out = tmp_path / "uqff" / "llama-q4k.uqff"
    Runner(Which.Plain(model_id=str(tmp_path / "llama"), write_uqff=str(out), dtype=ModelDType.F32),
           in_situ_quant="Q4K", show_progress=False).close()

    def reader() -> Runner:
        return Runner(Which.Plain(model_id=str(out.parent), from_uqff=out.name, dtype=ModelDType.F32),
                      show_progress=False)

    alone = reader()
    try:
        want = [chat(alone, prompt, logit_bias=NO_SPECIAL) for prompt in PROMPTS[:2]]
    finally:
        alone.close()
    runner = tp_runner(reader, monkeypatch)
    try:
        assert runner.llm_engine._tp is not None
        for prompt, reply in zip(PROMPTS[:2], want):
            assert_same_choice(chat(runner, prompt, logit_bias=NO_SPECIAL), reply)
    finally:
        runner.close()
