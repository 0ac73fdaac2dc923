"""The execution options (mistralrs/worker/options.py): defaults, validation, the environment, and how the model
runner applies them (MoE backend and fused decoder layers on the model, attention backend on every step, the CPU
thread policy around every step)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.core.scheduler import ScheduledSequence, SchedulerOutput
from mistralrs.core.sequence import Sequence
from mistralrs.layers.fused_decode import fused_twin
from mistralrs.layers.moe import FusedMoE
from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import LlamaForCausalLM
from mistralrs.models.mixtral import MixtralForCausalLM
from mistralrs.sample import SamplingParams
from mistralrs.worker.cpu_threads import TRIAL_STEPS, WARMUP_STEPS
from mistralrs.worker.model_runner import ModelRunner, SeqSampling
from mistralrs.worker.options import ExecutionOptions
from tests.models.family_harness import torch_threads

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
BLOCK_SIZE = 8


def test_defaults_are_the_fast_paths_and_leave_the_thread_count_alone():
    options = ExecutionOptions()
    assert (options.attention_backend, options.moe_backend, options.fused_decode, options.fast_kernels,
            options.cpu_threads) == ("sdpa", "fused", True, True, "fixed")


@pytest.mark.parametrize("field, value", [("attention_backend", "flash"), ("moe_backend", "bmm"),
                                          ("cpu_threads", "all"), ("fused_decode", 1), ("fast_kernels", "yes")])
def test_a_bad_value_names_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        ExecutionOptions(**{field: value})


@pytest.mark.parametrize("raw, fused", [("0", False), (" off ", False), ("FALSE", False), ("no", False),
                                        ("1", True), ("yes", True), ("", True)])
def test_the_environment_sets_the_fused_decode_switch(raw, fused):
    assert ExecutionOptions.from_env(environ={"MISTRALRS_FUSED_DECODE": raw}).fused_decode is fused


def test_the_environment_overrides_the_defaults_it_is_given_and_only_where_it_is_set():
    assert ExecutionOptions.from_env(environ={}) == ExecutionOptions()
    defaults = ExecutionOptions(moe_backend="reference", fused_decode=False, cpu_threads="auto")
    assert ExecutionOptions.from_env(defaults, {}) == defaults
    assert ExecutionOptions.from_env(defaults, {"MISTRALRS_FUSED_DECODE": "1", "MISTRALRS_CPU_THREADS": "Fixed"}) \
        == ExecutionOptions(moe_backend="reference", fused_decode=True, cpu_threads="fixed")


@pytest.mark.parametrize("variable", ["MISTRALRS_FUSED_DECODE", "MISTRALRS_CPU_THREADS"])
def test_a_bad_variable_value_names_the_variable(variable):
    with pytest.raises(ValueError, match=f"{variable}='maybe'"):
        ExecutionOptions.from_env(environ={variable: "maybe"})


def test_library_and_service_differ_in_the_thread_policy_and_both_read_the_environment(monkeypatch):
    library, service = ExecutionOptions.for_library(environ={}), ExecutionOptions.for_service(environ={})
    assert (library.cpu_threads, service.cpu_threads) == ("fixed", "auto")
    assert library.fused_decode and service.fused_decode
    monkeypatch.setenv("MISTRALRS_FUSED_DECODE", "0")
    monkeypatch.setenv("MISTRALRS_CPU_THREADS", "auto")
    library, service = ExecutionOptions.for_library(), ExecutionOptions.for_service()
    assert (library.cpu_threads, service.cpu_threads) == ("auto", "auto")
    assert not library.fused_decode and not service.fused_decode


def tiny(cls: type, **overrides) -> torch.nn.Module:
    model = cls(TextModelConfig.from_hf_dict({**TINY, **overrides}), dtype=torch.float32, device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def greedy(runner: ModelRunner, num_tokens: int) -> list[int]:
    """`num_tokens` greedy tokens of one sequence through `runner.execute`: its prompt in one step, then one token
    per step, as the scheduler would schedule them."""
    seq = Sequence(seq_id=0, prompt_token_ids=[3, 1, 4, 1, 5, 9, 2, 6], block_ids=list(range(4)))
    sampling = {0: SeqSampling(SamplingParams(temperature=0.0), None)}
    for _ in range(num_tokens):
        new = seq.num_tokens - seq.num_computed_tokens
        sampled = runner.execute(SchedulerOutput([ScheduledSequence(seq, new, True)]), sampling)
        seq.num_computed_tokens += new
        seq.output_token_ids.append(sampled[0][-1].token_id)
    return seq.output_token_ids


def make_runner(model: torch.nn.Module, options: ExecutionOptions) -> ModelRunner:
    return ModelRunner(model, num_blocks=4, block_size=BLOCK_SIZE, kv_dtype=torch.float32,
                       device=torch.device("cpu"), options=options)


@pytest.mark.parametrize("options", [ExecutionOptions(), ExecutionOptions(attention_backend="reference",
                                                                          fused_decode=False)])
def test_the_runner_applies_the_fused_switch_and_the_attention_backend(options):
    model = tiny(LlamaForCausalLM)
    backends = []
    model.model.layers[0].register_forward_pre_hook(lambda _m, args: backends.append(args[3].attention_backend))
    runner = make_runner(model, options)
    assert all((fused_twin(layer) is not None) == options.fused_decode for layer in model.model.layers)
    greedy(runner, 3)
    assert backends == [options.attention_backend] * 3


def test_the_runner_applies_the_moe_backend():
    model = tiny(MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2)
    experts = [module for module in model.modules() if isinstance(module, FusedMoE)]
    make_runner(model, ExecutionOptions(moe_backend="reference"))
    assert len(experts) == 2 and all(moe.backend == "reference" for moe in experts)


def test_the_fixed_thread_policy_never_sets_the_thread_count(monkeypatch):
    """Enough decode steps for the "auto" chooser to try both settings: under "fixed" torch is never told, under
    "auto" it is; the tokens are the same (thread counts do not change results)."""
    num_tokens = 2 + WARMUP_STEPS + TRIAL_STEPS
    tokens, calls = {}, {}
    with torch_threads(2):
        for policy in ("fixed", "auto"):
            runner = make_runner(tiny(LlamaForCausalLM), ExecutionOptions(cpu_threads=policy, fused_decode=False))
            calls[policy] = []
            with monkeypatch.context() as patch:
                patch.setattr(torch, "set_num_threads", calls[policy].append)
                tokens[policy] = greedy(runner, num_tokens)
    assert calls["fixed"] == [] and 1 in calls["auto"]
    assert tokens["fixed"] == tokens["auto"]
