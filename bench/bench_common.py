"""What the benchmark scripts share: the prompt text and the single-stream decode measurement.

Imported as `bench_common` (each script is run as `python bench/<script>.py`, which puts this folder on sys.path);
it imports nothing from mistralrs at module level, so the reference wheel's environment can use it too.
"""

from __future__ import annotations

SEED_TEXT = ("The history of computing is a story of people, machines and ideas. It begins with counting "
             "boards and mechanical calculators, continues through punched cards and vacuum tubes, and arrives "
             "at the microprocessors and networks that shape daily life. ")


def prompt_of(tokenize, n_tokens: int) -> str:
    """`SEED_TEXT` repeated and trimmed to `n_tokens` tokens under `tokenize`."""
    text = SEED_TEXT
    while len(tokenize(text)) < n_tokens:
        text += SEED_TEXT
    while len(tokenize(text)) > n_tokens:
        text = text[:-8]
    return text


def runner_decode_tps(which, n_decode: int, **runner_args) -> float:
    """Greedy single-stream decode tokens/s of this engine's Runner over `n_decode` tokens (EOS banned), after a
    short warm-up request; the Runner is closed afterwards."""
    from mistralrs import CompletionRequest, Runner

    runner = Runner(which, prefix_cache_n=0, show_progress=False, **runner_args)
    try:
        no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}

        def complete(max_tokens: int):
            return runner.send_completion_request(CompletionRequest(
                prompt="Once upon a time", model="m", max_tokens=max_tokens, temperature=0.0,
                logit_bias=no_eos)).usage

        complete(8)
        usage = complete(n_decode)
        return usage.completion_tokens / usage.total_completion_time_sec
    finally:
        runner.close()
