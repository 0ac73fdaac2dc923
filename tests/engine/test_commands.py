"""Typed control commands: the engine thread runs each with the handler registered for its type, between steps."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pytest

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs.core import Scheduler, SchedulerConfig
from mistralrs.engine.commands import ActivateAdapters, Command, ReIsq
from mistralrs.engine.engine import Engine
from mistralrs.quant.isq import IsqLinearMethod, IsqQuantConfig
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@dataclass(frozen=True)
class Ping(Command):
    """A test command: the handler answers with its value and the thread it ran on."""

    value: int  # echoed back


class Unknown(Command):
    """A command no handler takes."""


def _fail(command: Ping) -> None:
    raise ValueError(f"ping {command.value} failed")


@pytest.fixture
def engine():
    """An engine without a model: it only runs commands (no request is ever added)."""
    handlers = {Ping: lambda c: (c.value, threading.current_thread().name), ReIsq: lambda c: None}
    engine = Engine(Scheduler(SchedulerConfig()), None, None, handlers=handlers)
    yield engine
    engine.shutdown()


def test_call_runs_the_handler_of_the_command_type_on_the_engine_thread(engine):
    assert engine.call(Ping(3)) == (3, "mistralrs-engine")


def test_a_command_without_a_handler_is_refused_at_once_naming_the_known_ones(engine):
    with pytest.raises(TypeError, match=r"unknown engine command 'Unknown': this engine handles Ping, ReIsq"):
        engine.call(Unknown())
    with pytest.raises(TypeError, match="unknown engine command 'ActivateAdapters'"):
        engine.post(ActivateAdapters(("a1",)))
    assert engine.call(Ping(1)) == (1, "mistralrs-engine")   # the engine is unharmed


def test_a_failing_handler_raises_in_call_and_is_logged_after_post(caplog):
    engine = Engine(Scheduler(SchedulerConfig()), None, None, handlers={Ping: _fail})
    try:
        with pytest.raises(ValueError, match="ping 1 failed"):
            engine.call(Ping(1))
        with caplog.at_level(logging.ERROR, logger="mistralrs.engine.engine"):
            engine.post(Ping(2))
            with pytest.raises(ValueError, match="ping 3 failed"):
                engine.call(Ping(3))   # runs after the posted one: the engine carried on
        assert "engine command Ping failed" in caplog.text and "ping 2 failed" in caplog.text
    finally:
        engine.shutdown()


def test_commands_check_their_fields():
    with pytest.raises(ValueError, match="ReIsq.isq_type must be a parsed IsqType"):
        ReIsq("Q4K")
    with pytest.raises(ValueError, match="ActivateAdapters.names"):
        ActivateAdapters("a1")


def test_re_isq_runs_on_the_engine_thread_between_two_steps(tmp_path, monkeypatch):
    make_tiny_model_dir(tmp_path, "llama")
    runner = Runner(Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32), show_progress=False)
    engine = runner.llm_engine._engine
    stepping = threading.Event()
    events = []
    execute, quantize, reset = engine.model_runner.execute, IsqQuantConfig.quantize_loaded, \
        engine.scheduler.reset_prefix_cache

    def step(*args):
        stepping.set()
        try:
            return execute(*args)
        finally:
            stepping.clear()

    def quantize_loaded(config, model):
        events.append(("quantize", threading.current_thread().name, stepping.is_set()))
        return quantize(config, model)

    def reset_prefix_cache():
        events.append(("reset", threading.current_thread().name, stepping.is_set()))
        reset()

    monkeypatch.setattr(engine.model_runner, "execute", step)
    monkeypatch.setattr(IsqQuantConfig, "quantize_loaded", quantize_loaded)
    monkeypatch.setattr(engine.scheduler, "reset_prefix_cache", reset_prefix_cache)
    special = range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))
    try:
        chunks = runner.send_completion_request(CompletionRequest(
            prompt="abc", model="t", max_tokens=24, temperature=0.0, stream=True,
            logit_bias={i: -1e9 for i in special}))
        next(chunks)
        runner.send_re_isq("Q8_0")
        rest = list(chunks)
        after = runner.send_completion_request(CompletionRequest(prompt="abc", model="t", max_tokens=2))
    finally:
        runner.close()
    assert rest and after.choices
    assert events == [("quantize", "mistralrs-engine", False), ("reset", "mistralrs-engine", False)]
    assert isinstance(runner.llm_engine._loaded.model.lm_head.quant_method, IsqLinearMethod)
