"""The engine loop: one background thread that schedules, runs the model and streams results."""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from mistralrs.adapters.runtime import adapter_cache_salt
from mistralrs.core import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from mistralrs.engine.commands import Command, CommandHandlers, unknown_command
from mistralrs.engine.output_processor import SeqOutputState
from mistralrs.engine.request import EngineRequest, RequestFinished, SeqDelta
from mistralrs.sample import SampledToken
from mistralrs.worker.model_runner import ModelRunner, SeqSampling

logger = logging.getLogger(__name__)

_FINISH_STATUS = {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH,
                  "canceled": SequenceStatus.FINISHED_ABORTED}


def _cache_salt(adapters: tuple[str, ...] | None, request: EngineRequest) -> str | None:
    """A sequence's prefix-cache key besides its tokens: its adapter set and its images' digest."""
    parts = [salt for salt in (adapter_cache_salt(adapters), request.images.digest if request.images else None)
             if salt]
    return "|".join(parts) or None


@dataclass
class _RequestState:
    """Engine-side state of one request and its sequences."""

    request: EngineRequest
    outputs: dict[int, SeqOutputState]            # seq_id → output state
    seq_ids: list[int]
    first_token_time: float | None = None
    num_cached_prompt_tokens: int = 0
    finished: set[int] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.seq_ids)


class Engine:
    """Owns the scheduler and the model runner; serves requests from any thread.

    `submit`, `abort`, `call` and `post` are thread-safe: they only enqueue work for the engine thread, which is
    the single owner of all scheduling and model state. Control commands (engine/commands.py) run between two
    steps with the handler registered for their type.
    """

    def __init__(self, scheduler: Scheduler, model_runner: ModelRunner, tokenizer, *,
                 seed: int | None = None, handlers: CommandHandlers | None = None) -> None:
        self.scheduler = scheduler
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handlers = dict(handlers or {})   # control command type -> its handler (run on the engine thread)
        self._requests: dict[str, _RequestState] = {}
        self._seq_owner: dict[int, _RequestState] = {}
        self._seq_sampling: dict[int, SeqSampling] = {}
        self._next_seq_id = 0
        self._rng = random.Random(0 if seed is None else seed)   # seeds sequences that have no seed of their own
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="mistralrs-engine", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> None:
        """Queue a request; its results arrive on `request.outputs`."""
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        self._commands.put(("add", request))

    def abort(self, request_id: str) -> None:
        """Cancel a request; it stops within one engine step and frees its KV blocks."""
        self._commands.put(("abort", request_id))

    def call(self, command: Command, timeout: float = 60.0):
        """Run a control command on the engine thread between two steps and return its handler's result (or raise
        its error). TypeError, at once, for a command type the engine has no handler for."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._put_command(command, done)
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def post(self, command: Command) -> None:
        """Run a control command on the engine thread between two steps without waiting; an error is logged.

        Commands run in the order they are queued, so a request submitted after `post` sees its effect.
        """
        self._put_command(command, None)

    def _put_command(self, command: Command, done: queue.SimpleQueue | None) -> None:
        if self._stopped:   # nothing would ever run it (and `call` would wait for ever)
            raise RuntimeError("the engine has been shut down")
        if type(command) not in self._handlers:
            raise unknown_command(command, self._handlers)
        self._commands.put(("command", (command, done)))

    def shutdown(self) -> None:
        """Cancel everything in flight and stop the thread."""
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            block = not self.scheduler.has_unfinished()
            if not self._drain_commands(block):
                return
            output = None
            try:
                output = self.scheduler.schedule()
                self._step(output)
            except Exception as exc:   # a failing step must not kill the engine: fail the requests it touched
                logger.exception("engine step failed")
                self._fail_requests(exc, output)

    def _drain_commands(self, block: bool) -> bool:
        # a blocking wait wakes every `idle_interval` seconds to call the runner's `idle` (tensor parallelism)
        interval = getattr(self.model_runner, "idle_interval", None) if block else None
        while True:
            try:
                kind, payload = self._commands.get(block=block, timeout=interval)
            except queue.Empty:
                if not block:
                    return True
                self.model_runner.idle()
                continue
            block, interval = False, None
            if kind == "add":
                self._add_safely(payload)
            elif kind == "abort":
                self._cancel(payload)
            elif kind == "command":
                self._run_command(*payload)
            else:
                for request_id in list(self._requests):
                    self._cancel(request_id)
                self._stopped = True
                return False

    def _run_command(self, command: Command, done: queue.SimpleQueue | None) -> None:
        """Run `command` with the handler of its type; its result or error goes to `done` (None: errors logged)."""
        try:
            result = self._handlers[type(command)](command)
        except Exception as exc:
            if done is None:   # posted: the caller is gone; the engine carries on
                logger.exception("engine command %s failed", type(command).__name__)
            else:
                done.put((False, exc))
            return
        if done is not None:
            done.put((True, result))

    def _add_safely(self, request: EngineRequest) -> None:
        """Add a request; one that cannot be set up fails alone instead of stopping the engine."""
        try:
            self._add(request)
        except Exception as exc:
            logger.exception("request %s could not be added", request.request_id)
            state = self._requests.pop(request.request_id, None)
            for seq_id in state.seq_ids if state else []:
                self.scheduler.abort_sequence(seq_id)
                self._seq_owner.pop(seq_id, None)
                self._seq_sampling.pop(seq_id, None)
            request.outputs.put(exc)

    def _add(self, request: EngineRequest) -> None:
        state = _RequestState(request, {}, [])
        self._requests[request.request_id] = state
        runtime = getattr(self.model_runner, "adapters", None)   # adapter sets are fixed here, on the engine thread
        adapters = runtime.resolve(request.adapters) if runtime is not None else None
        for index in range(request.num_seqs):
            seq_id = self._next_seq_id
            self._next_seq_id += 1
            seq = Sequence(seq_id, list(request.prompt_token_ids), arrival_time=request.arrival_time,
                           cache_salt=_cache_salt(adapters, request), max_output_tokens=request.stop.max_tokens,
                           # grammar-constrained sequences decode without a draft
                           max_draft_tokens=self.model_runner.max_draft_tokens if request.grammar is None else 0)
            state.seq_ids.append(seq_id)
            state.outputs[seq_id] = SeqOutputState(
                index, self.tokenizer, request.prompt_token_ids, request.stop,
                want_logprobs=request.sampling.logprobs, skip_special_tokens=request.skip_special_tokens)
            self._seq_owner[seq_id] = state
            params = request.sampling
            if request.grammar is not None:   # a per-sequence copy carries the sequence's own matcher
                params = dataclasses.replace(params, grammar=request.grammar.new_state())
            self._seq_sampling[seq_id] = SeqSampling(params, self._generator(request, index), adapters,
                                                     request.images)
            self.scheduler.add_sequence(seq)

    def _generator(self, request: EngineRequest, index: int) -> torch.Generator | None:
        if request.sampling.is_greedy:
            return None
        seed = request.sampling.seed
        generator = torch.Generator(device=self.model_runner.device)
        generator.manual_seed(self._rng.getrandbits(63) if seed is None else (seed * 1_000_003 + index) % 2**63)
        return generator

    def _cancel(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        deltas = []
        for seq_id in state.seq_ids:
            if seq_id not in state.finished:
                self.scheduler.abort_sequence(seq_id)
                deltas.append(state.outputs[seq_id].cancel())
                state.finished.add(seq_id)
        state.request.outputs.put(deltas)
        self._complete(state)

    def _step(self, output: SchedulerOutput) -> None:
        if output.is_empty:
            if self.scheduler.has_unfinished():
                time.sleep(0.001)   # only waiting on blocks another sequence will release
            return
        shares = self._shares(output)
        try:
            sampled = self.model_runner.execute(output, self._seq_sampling)
        except Exception as exc:
            if len(shares) < 2:
                raise
            logger.warning("engine step of %d requests failed (%s: %s); running each request alone", len(shares),
                           type(exc).__name__, exc)
            self._run_each_alone(shares)
            return
        self._apply(output, sampled)

    def _shares(self, output: SchedulerOutput) -> dict[str, list]:
        """The step's scheduled sequences grouped by request, in the step's order."""
        shares: dict[str, list] = {}
        for item in output.scheduled:
            shares.setdefault(self._seq_owner[item.seq.seq_id].request.request_id, []).append(item)
        return shares

    def _run_each_alone(self, shares: dict[str, list]) -> None:
        """After a failed step: run each request's share of it alone, in the step's order, and fail only the
        requests whose share fails alone. The failed step advanced no sequence (`update_from_output` never ran),
        so computing the same chunks again is safe; a share whose context includes prefix blocks that a failed
        share was to write is sent back to be recomputed instead."""
        for request_id, items in shares.items():
            state = self._requests[request_id]
            if not self.scheduler.reads_only_written_kv(items):
                for item in reversed(items):
                    self.scheduler.recompute_sequence(item.seq.seq_id)
                continue
            alone = SchedulerOutput(scheduled=items)
            try:
                self._apply(alone, self.model_runner.execute(alone, self._seq_sampling))
            except Exception as exc:
                logger.exception("request %s failed when run alone", request_id)
                self._fail_request(state, exc)

    def _apply(self, output: SchedulerOutput, sampled: dict[int, list[SampledToken]]) -> None:
        """Advance the scheduler by a computed step and send each request what its sequences produced (one
        message per token when a sequence gained several: speculative decoding); a request whose output cannot be
        processed fails alone."""
        self.scheduler.update_from_output(
            output, {sid: tokens[-1].token_id for sid, tokens in sampled.items()},
            {sid: [tok.token_id for tok in tokens[:-1]] for sid, tokens in sampled.items() if len(tokens) > 1})
        now = time.monotonic()
        per_request: dict[str, list[list[SeqDelta]]] = {}
        for scheduled in output.scheduled:
            seq = scheduled.seq
            state = self._seq_owner.get(seq.seq_id)
            if state is None:   # its request failed earlier in this loop
                continue
            state.num_cached_prompt_tokens = max(state.num_cached_prompt_tokens, seq.num_cached_prompt_tokens)
            if seq.seq_id not in sampled:
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            try:
                deltas = self._process_tokens(seq.seq_id, state, sampled[seq.seq_id])
            except Exception as exc:
                logger.exception("request %s: output of sequence %d failed", state.request.request_id, seq.seq_id)
                per_request.pop(state.request.request_id, None)
                self._fail_request(state, exc)
                continue
            rounds = per_request.setdefault(state.request.request_id, [])
            rounds.extend([] for _ in range(len(deltas) - len(rounds)))
            for round_deltas, delta in zip(rounds, deltas):
                round_deltas.append(delta)
        for request_id, rounds in per_request.items():
            state = self._requests[request_id]
            for deltas in rounds:
                state.request.outputs.put(deltas)
            if state.done:
                self._complete(state)

    def _process_tokens(self, seq_id: int, state: _RequestState, tokens: list[SampledToken]) -> list[SeqDelta]:
        """The deltas of a sequence's tokens of one step, in order, up to the first that finishes it."""
        deltas = []
        for sampled in tokens:
            deltas.append(self._process(seq_id, state, sampled))
            if deltas[-1].finish_reason is not None:
                break
        return deltas

    def _process(self, seq_id: int, state: _RequestState, sampled: SampledToken) -> SeqDelta:
        """Advance the sequence's grammar, turn its token into a delta, and finish it when a stop condition holds."""
        grammar = self._seq_sampling[seq_id].params.grammar
        if grammar is not None and not grammar.advance(sampled.token_id):
            logger.warning("sequence %d: sampled token rejected by its grammar: %s", seq_id,
                           grammar.matcher.get_error())
        delta = state.outputs[seq_id].process(sampled)
        if delta.finish_reason is not None:
            self.scheduler.finish_sequence(seq_id, _FINISH_STATUS[delta.finish_reason])
            state.finished.add(seq_id)
        return delta

    def _complete(self, state: _RequestState) -> None:
        request = state.request
        now = time.monotonic()
        first = state.first_token_time or now
        results = sorted((out.result() for out in state.outputs.values()), key=lambda r: r.index)
        request.outputs.put(RequestFinished(
            results=results,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_prompt_tokens=state.num_cached_prompt_tokens,
            num_completion_tokens=sum(len(r.token_ids) for r in results),
            prompt_time_sec=first - request.arrival_time,
            completion_time_sec=now - first,
            total_time_sec=now - request.arrival_time,
        ))
        for seq_id in state.seq_ids:
            self._seq_owner.pop(seq_id, None)
            self._seq_sampling.pop(seq_id, None)
        self._requests.pop(request.request_id, None)

    def _fail_requests(self, exc: Exception, output: SchedulerOutput | None) -> None:
        """Fail the requests of the step that raised (all of them when scheduling itself raised)."""
        if output is None:
            touched = set(self._requests)
        else:
            touched = {owner.request.request_id for s in output.scheduled
                       if (owner := self._seq_owner.get(s.seq.seq_id)) is not None}
        for request_id in touched:
            state = self._requests.get(request_id)
            if state is not None:
                self._fail_request(state, exc)

    def _fail_request(self, state: _RequestState, exc: Exception) -> None:
        """Abort a request's sequences and send it the error."""
        for seq_id in state.seq_ids:
            self.scheduler.abort_sequence(seq_id)
        state.request.outputs.put(exc)
        for seq_id in state.seq_ids:
            self._seq_owner.pop(seq_id, None)
            self._seq_sampling.pop(seq_id, None)
        self._requests.pop(state.request.request_id, None)
