"""Hostile clients against `mistralrs serve` (the default SmolLM2 GGUF): huge prompts, slow bodies, half-closes.

    .venv/bin/python bench/bench_hostile.py huge [--mb 44] [--requests 3]
    .venv/bin/python bench/bench_hostile.py slow [--connections 300] [--hold 20] [-- SERVER OPTIONS]

Both start the server as a subprocess (`python -m mistralrs serve --port P [SERVER OPTIONS]`, the `mistralrs` found
on PYTHONPATH, so the same script measures any checkout) on 127.0.0.1 and stop it at the end; every client
socket has a timeout, so the script always ends by itself.

- `huge`: --requests chat requests whose one message is --mb MiB of text, one after the other. Per request: the
  status and wall time, the server's CPU seconds (user + system), its peak RSS while serving it, and the longest
  answer time of `GET /health` polled meanwhile (how long the event loop was blocked); then the server's RSS
  after all of them.
- `slow`: --connections clients each send a POST's headers and 10 of the 1000 bytes their Content-Length
  announces, then nothing. Reports how many of them the server still holds open after 2 s, 10 s and --hold s,
  whether a normal request is served meanwhile, and whether a client that half-closes its socket after a
  complete request (`shutdown(SHUT_WR)`) gets its answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import psutil

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Server:
    """`python -m mistralrs serve` on a free local port, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, options: list[str]) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "mistralrs", "serve", "--port", str(self.port),
                                         *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ps = psutil.Process(self.process.pid)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if _get(self.port, "/health", timeout=2) == 200:
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start in 300 s")

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20


def _post_json(port: int, path: str, body: bytes, timeout: float = 900) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def huge(args: argparse.Namespace) -> None:
    words = "hello world, this is a long prompt. "
    content = words * (args.mb * 2**20 // len(words))
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1}).encode()
    with Server(args.server_options) as server:
        print(f"server RSS at start: {server.rss_mib():.0f} MiB; body {len(body) / 2**20:.1f} MiB")
        for i in range(args.requests):
            done = threading.Event()
            peak = [server.rss_mib()]
            health = [0.0]

            def sample_rss() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], server.rss_mib())
                    time.sleep(0.05)

            def poll_health() -> None:
                while not done.is_set():
                    start = time.perf_counter()
                    try:
                        _get(server.port, "/health", timeout=900)
                    except OSError:
                        pass
                    health[0] = max(health[0], time.perf_counter() - start)
                    time.sleep(0.1)

            watchers = [threading.Thread(target=sample_rss), threading.Thread(target=poll_health)]
            cpu, wall = server.cpu_seconds(), time.perf_counter()
            for watcher in watchers:
                watcher.start()
            status, reply = _post_json(server.port, "/v1/chat/completions", body)
            wall = time.perf_counter() - wall
            done.set()
            for watcher in watchers:
                watcher.join()
            reason = json.loads(reply).get("error", {}).get("code") if status != 200 else "ok"
            print(f"request {i}: {status} {reason} in {wall:.1f} s; server CPU {server.cpu_seconds() - cpu:.1f} s, "
                  f"peak RSS {peak[0]:.0f} MiB, longest /health {health[0] * 1000:.0f} ms")
        time.sleep(2)
        print(f"server RSS after {args.requests} requests: {server.rss_mib():.0f} MiB")


def _open_slow_bodies(port: int, count: int) -> list[socket.socket]:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.sendall(head + b'{"prompt":')
        sockets.append(sock)
    return sockets


def _still_open(sockets: list[socket.socket]) -> int:
    """Sockets the server has not closed (nothing to read; a 408 or an EOF counts as closed)."""
    open_count = 0
    for sock in sockets:
        if sock.fileno() < 0:
            continue
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            open_count += 1
            continue
        sock.close()
    return open_count


def _half_close(port: int) -> str:
    body = json.dumps({"prompt": "Hello", "max_tokens": 4}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection((HOST, port), timeout=60) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    while data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):   # interim answers, which clients skip
        data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    return data.split(b"\r\n", 1)[0].decode() if data else "(connection closed, no answer)"


def slow(args: argparse.Namespace) -> None:
    with Server(args.server_options) as server:
        print(f"half-closing client: {_half_close(server.port)}")
        start = time.monotonic()
        sockets = _open_slow_bodies(server.port, args.connections)
        print(f"{len(sockets)} partial bodies sent in {time.monotonic() - start:.1f} s")
        for at in (2, 10, args.hold):
            time.sleep(max(0.0, start + at - time.monotonic()))
            print(f"after {at:>3} s: {_still_open(sockets)} held open by the server")
            if at == 2:
                try:
                    status = _get(server.port, "/health", timeout=10)
                except OSError as exc:
                    status = f"failed: {exc}"
                print(f"  a normal request meanwhile: {status}")
        for sock in sockets:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["huge", "slow"])
    parser.add_argument("--mb", type=int, default=44, help="huge: MiB of prompt text per request")
    parser.add_argument("--requests", type=int, default=3, help="huge: requests, one after the other")
    parser.add_argument("--connections", type=int, default=300, help="slow: clients sending a partial body")
    parser.add_argument("--hold", type=int, default=30, help="slow: seconds the slow clients wait")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.server_options = argv[split + 1:]   # after --: options of `mistralrs serve`
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (huge if args.mode == "huge" else slow)(args)


if __name__ == "__main__":
    main()
