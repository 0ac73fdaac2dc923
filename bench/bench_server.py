"""HTTP streaming throughput of the server against the in-process Runner, on the default SmolLM2 GGUF.

    .venv/bin/python bench/bench_server.py [--clients 1,8] [--max-tokens 128] [--threads 2] [--repeats 3]
                                           [--plain MODEL_DIR]   (another model: a Hugging Face directory)

For each client count, N concurrent greedy chat streams of --max-tokens tokens each (EOS banned) run
  - in process: N threads iterating `Runner.send_chat_completion_request(stream=True)`;
  - over HTTP: the same requests sent by a separate client process (plain sockets, SSE parsed with `json`) to
    the server running in this process on a local port, with `stream_options.include_usage`.
Aggregate tokens/s = generated tokens / wall time from the first request to the last `[DONE]`. Runs alternate
between the two and the best of --repeats is kept. Prints a Markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def prompt(i: int) -> str:
    return f"Tell me a long story about robot number {i} and its friends."


# ---- client process (stdlib only) --------------------------------------------------------------------------
def _http_stream(host: str, port: int, body: dict, counts: list[int]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            counts.append(chunk["usage"]["completion_tokens"])
    conn.close()


def run_client(host: str, port: int, num_clients: int, max_tokens: int, no_eos: dict) -> None:
    counts: list[int] = []
    bodies = [{"model": "default", "messages": [{"role": "user", "content": prompt(i)}], "stream": True,
               "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens,
               "logit_bias": no_eos} for i in range(num_clients)]
    threads = [threading.Thread(target=_http_stream, args=(host, port, b, counts)) for b in bodies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"tokens": sum(counts), "seconds": time.perf_counter() - start}))


# ---- server side ---------------------------------------------------------------------------------------------
def in_process(runner, num_clients: int, max_tokens: int, no_eos: dict) -> float:
    from mistralrs import ChatCompletionRequest

    counts: list[int] = []

    def stream(i: int) -> None:
        request = ChatCompletionRequest(messages=[{"role": "user", "content": prompt(i)}], model="default",
                                        stream=True, temperature=0, max_tokens=max_tokens, logit_bias=no_eos)
        for chunk in runner.send_chat_completion_request(request):
            if chunk.usage is not None:
                counts.append(chunk.usage.completion_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(num_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def over_http(server, num_clients: int, max_tokens: int, no_eos: dict) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--client", server.host, str(server.port), str(num_clients),
           str(max_tokens), json.dumps(no_eos)]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", default=None, help="benchmark this Hugging Face model directory instead")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    import torch

    from mistralrs import Runner, Which
    from mistralrs.cli import default_model_which
    from mistralrs.server import BackgroundServer

    torch.set_num_threads(args.threads)
    which = Which.Plain(model_id=args.plain) if args.plain else default_model_which()
    runner = Runner(which, prefix_cache_n=0, show_progress=False)
    specials = [runner.tokenize_text(t, False) for t in ("<|im_end|>", "<|endoftext|>")]
    no_eos = {str(ids[0]): -100.0 for ids in specials if len(ids) == 1}
    in_process(runner, 1, 8, no_eos)   # warm up
    rows = []
    with BackgroundServer(runner) as server:
        over_http(server, 1, 8, no_eos)
        for num_clients in [int(c) for c in args.clients.split(",")]:
            local, http = [], []
            for _ in range(args.repeats):
                local.append(in_process(runner, num_clients, args.max_tokens, no_eos))
                http.append(over_http(server, num_clients, args.max_tokens, no_eos))
            rows.append((num_clients, max(local), max(http)))
            print(num_clients, local, http, file=sys.stderr)
    runner.close()
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    name = args.plain or "SmolLM2-135M-Instruct Q4_1"
    print(f"\n{name} ({device}), greedy chat streams of {args.max_tokens} tokens\n")
    print("| concurrent streams | in-process Runner tok/s | HTTP server tok/s | HTTP / in-process |")
    print("|---|---|---|---|")
    for num_clients, local, http in rows:
        print(f"| {num_clients} | {local:.1f} | {http:.1f} | {http / local:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        host, port, num, max_tokens, no_eos = sys.argv[2:7]
        run_client(host, int(port), int(num), int(max_tokens), json.loads(no_eos))
    else:
        main()
