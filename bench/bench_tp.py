"""Cost of tensor parallelism's step broadcast, and decode with 1 and N ranks, on the default model (SmolLM2-135M,
GGUF Q4_1).

For each rank count (`--ranks`, 1 first) a `Runner` greedily decodes `--n-decode` tokens for `--streams` concurrent
streams; the head's `Channel.send` is timed and the pickled size of each message recorded. Prints one JSON line per
rank count: tokens/s, milliseconds per step, the broadcast's median and 90th percentile in microseconds and the
message's median and largest size in bytes. On CPU the ranks are gloo processes (MISTRALRS_TP_SIZE); with several
GPUs, NCCL. Each rank holds and computes its shard of the model; the ranks' partial sums meet in all-reduces (every
row-parallel layer, the embedding) and the logits in an all-gather. Example:
    python bench/bench_tp.py --ranks 1 2 --streams 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import threading
import time

from mistralrs import CompletionRequest, Runner, Which
from mistralrs.distributed import runtime
from mistralrs.loader.default_model import default_model_path


class TimedSends:
    """Wraps `Channel.send` of this process: its durations and message sizes."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        send = runtime.Channel.send

        def timed(channel, message):
            start = time.perf_counter()
            send(channel, message)
            self.seconds.append(time.perf_counter() - start)
            self.sizes.append(len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))

        runtime.Channel.send = timed

    def clear(self) -> None:
        self.seconds.clear()
        self.sizes.clear()


def decode(runner: Runner, streams: int, n_decode: int) -> float:
    """Seconds for `streams` concurrent greedy completions of `n_decode` tokens each."""

    def one(index: int) -> None:
        runner.send_completion_request(CompletionRequest(
            prompt=f"Story number {index}: once upon a time", model="m", max_tokens=n_decode, temperature=0.0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--n-decode", type=int, default=64)
    args = parser.parse_args()
    path = default_model_path()
    sends = TimedSends()
    for ranks in args.ranks:
        os.environ["MISTRALRS_TP_SIZE"] = str(ranks)
        runner = Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
                        show_progress=False)
        for streams in args.streams:   # warm-up: each batch size's thread-count trial, the first steps
            decode(runner, streams, 8)
        for streams in args.streams:
            sends.clear()
            seconds = decode(runner, streams, args.n_decode)
            steps = max(len(sends.seconds), args.n_decode)
            row = {"ranks": ranks, "streams": streams, "tok_per_s": round(streams * args.n_decode / seconds, 1),
                   "ms_per_step": round(seconds / steps * 1e3, 2)}
            if sends.seconds:
                row.update(broadcast_us_median=round(statistics.median(sends.seconds) * 1e6),
                           broadcast_us_p90=round(sorted(sends.seconds)[int(0.9 * len(sends.seconds))] * 1e6),
                           message_bytes_median=int(statistics.median(sends.sizes)), message_bytes_max=max(sends.sizes))
            print(json.dumps(row), flush=True)
        runner.close()


if __name__ == "__main__":
    main()
