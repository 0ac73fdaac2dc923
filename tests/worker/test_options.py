"""The execution options (mistralrs/worker/options.py): defaults, validation, the environment, and how the model
runner applies them (MoE backend and fused decoder layers on the model, attention backend on every step, the CPU
thread policy around every step)."""

from __future__ import annotations

import threading

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
from mistralrs.worker.cpu_threads import CpuThreadChooser, EngineThreadCount
from mistralrs.worker.model_runner import ModelRunner, SeqSampling
from mistralrs.worker.options import ExecutionOptions
from tests.models.family_harness import torch_threads

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
BLOCK_SIZE = 8
needs_openmp = pytest.mark.skipif(EngineThreadCount.setter() is None, reason="no per-thread count without OpenMP")


def test_defaults_are_the_fast_paths_and_the_measured_thread_count():
    options = ExecutionOptions()
    assert (options.attention_backend, options.moe_backend, options.fused_decode, options.fast_kernels,
            options.cpu_threads) == ("sdpa", "fused", True, True, "auto")


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
    defaults = ExecutionOptions(moe_backend="reference", fused_decode=False, cpu_threads="fixed")
    assert ExecutionOptions.from_env(defaults, {}) == defaults
    assert ExecutionOptions.from_env(defaults, {"MISTRALRS_FUSED_DECODE": "1", "MISTRALRS_CPU_THREADS": "Auto"}) \
        == ExecutionOptions(moe_backend="reference", fused_decode=True, cpu_threads="auto")


@pytest.mark.parametrize("variable", ["MISTRALRS_FUSED_DECODE", "MISTRALRS_CPU_THREADS"])
def test_a_bad_variable_value_names_the_variable(variable):
    with pytest.raises(ValueError, match=f"{variable}='maybe'"):
        ExecutionOptions.from_env(environ={variable: "maybe"})


def test_the_defaults_choose_threads_and_the_environment_overrides_them(monkeypatch):
    options = ExecutionOptions.from_env(environ={})
    assert options.cpu_threads == "auto" and options.fused_decode
    monkeypatch.setenv("MISTRALRS_FUSED_DECODE", "0")
    monkeypatch.setenv("MISTRALRS_CPU_THREADS", "fixed")
    options = ExecutionOptions.from_env()
    assert options.cpu_threads == "fixed" and not options.fused_decode


def tiny(cls: type, **overrides) -> torch.nn.Module:
    model = cls(TextModelConfig.from_hf_dict({**TINY, **overrides}), dtype=torch.float32, device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def greedy(runner: ModelRunner, num_tokens: int, prompt: tuple[int, ...] = (3, 1, 4, 1, 5, 9, 2, 6)) -> list[int]:
    """`num_tokens` greedy tokens of one sequence through `runner.execute`: its prompt in one step, then one token
    per step, as the scheduler would schedule them."""
    seq = Sequence(seq_id=0, prompt_token_ids=list(prompt), block_ids=list(range(4)))
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




def on_engine_thread(fn):
    """`fn()` run on a new thread, as the engine runs its steps; its result."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


def threads_per_step(model: torch.nn.Module) -> list[int]:
    """The thread count each later forward of `model` runs on (filled as the steps run)."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _module, _args: seen.append(torch.get_num_threads()))
    return seen


def clock_favouring(threads: int):
    """A fake clock under which steps on `threads` take 1 ms and steps on any other count 1 s."""
    now = [0.0]

    def clock() -> float:
        now[0] += 0.001 if torch.get_num_threads() == threads else 1.0
        return now[0]
    return clock


@needs_openmp
def test_the_threads_the_host_starts_keep_their_count_after_the_engine_chose_one():
    with torch_threads(2):
        runner = make_runner(tiny(LlamaForCausalLM), ExecutionOptions(fused_decode=False))   # "auto"
        runner.cpu_threads = CpuThreadChooser(torch.device("cpu"), "auto", clock=clock_favouring(1))
        seen = threads_per_step(runner.model)
        on_engine_thread(lambda: greedy(runner, 12))
        assert runner.cpu_threads.choice(1).chosen == 1 and seen[-6:] == [1] * 6
        assert on_engine_thread(torch.get_num_threads) == 2 and torch.get_num_threads() == 2


def test_the_fixed_thread_policy_never_sets_a_thread_count(monkeypatch):
    """Enough decode steps for the "auto" chooser to try both settings: under "fixed" no count is ever set, under
    "auto" the engine thread's is."""
    calls: dict[str, list[int]] = {}
    with torch_threads(2):
        for policy in ("fixed", "auto"):
            runner = make_runner(tiny(LlamaForCausalLM), ExecutionOptions(cpu_threads=policy, fused_decode=False))
            calls[policy] = []
            with monkeypatch.context() as patch:
                real_set = EngineThreadCount.set
                patch.setattr(EngineThreadCount, "set", lambda self, n: (calls[policy].append(n), real_set(self, n)))
                patch.setattr(torch, "set_num_threads", lambda n: calls[policy].append(("torch", n)))
                on_engine_thread(lambda: greedy(runner, 8))
    assert calls["fixed"] == [] and 1 in calls["auto"] and all(isinstance(n, int) for n in calls["auto"])


@needs_openmp
def test_the_tokens_are_the_same_whatever_the_thread_count():
    """A 20-token prompt (a batched step) and decode steps, on one thread and on two."""
    tokens, used = {}, {}
    with torch_threads(2):
        for threads in (1, 2):
            runner = make_runner(tiny(LlamaForCausalLM), ExecutionOptions(cpu_threads="fixed", fused_decode=False))
            seen = threads_per_step(runner.model)

            def engine() -> list[int]:
                EngineThreadCount.setter().set(threads)
                return greedy(runner, 6, prompt=tuple(range(3, 23)))

            tokens[threads], used[threads] = on_engine_thread(engine), set(seen)
    assert used == {1: {1}, 2: {2}} and tokens[1] == tokens[2]
