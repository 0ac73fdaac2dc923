"""Tensor parallelism started from the command line on CPU ranks: `mistralrs chat --tp-size 2`, one ordinary
script under `torchrun --nproc-per-node 2` (rank 1's `Runner(...)` serves as a rank and exits the process), and the
same script as two "nodes" started by hand with the reference's `MISTRALRS_MN_*` variables. Each gives the
single-process reply and leaves no rank behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import shutil
import uuid
from pathlib import Path

import pytest

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from tests.tiny_models import make_tiny_model_dir


def processes_with(marker: str) -> list[int]:
    """Process ids whose environment holds `marker` (a child rank inherits its parent's environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:   # gone meanwhile, or not ours to read
            continue
    return found


TORCHRUN_SCRIPT = """
import sys
from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
runner = Runner(Which.Plain(model_id=sys.argv[1], dtype=ModelDType.F32))
print("SERVED BY", runner.llm_engine._tp.plan.rank, flush=True)
reply = runner.send_chat_completion_request(ChatCompletionRequest(
    messages=[{"role": "user", "content": "Hello there"}], model="m", max_tokens=12, temperature=0.0))
print("REPLY", repr(reply.choices[0].message.content), flush=True)
if len(sys.argv) < 3:   # the reference's examples never close their Runner: interpreter exit must end every rank
    runner.close()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    """A tiny Llama directory and its single-process greedy reply to "Hello there"."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model_dir(path, "llama")
    alone = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32))
    want = alone.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Hello there"}], model="m", max_tokens=12,
        temperature=0.0)).choices[0].message.content
    alone.close()
    return path, want


def marked_env() -> tuple[dict[str, str], str]:
    """This environment without a TP size, plus a unique marker variable every process started from it inherits."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, MISTRALRS_NO_PROGRESS="1", MISTRALRS_TEST_MARKER=marker)
    env.pop("MISTRALRS_TP_SIZE", None)
    return env, f"MISTRALRS_TEST_MARKER={marker}"


def test_chat_with_tp_size_2_replies_as_one_process(tiny):
    path, want = tiny
    env, marker = marked_env()
    proc = subprocess.run([sys.executable, "-m", "mistralrs", "-v", "chat", "--tp-size", "2", "--temperature", "0",
                           "--max-tokens", "12", "plain", "-m", str(path), "-d", "f32"],
                          input="Hello there\n/exit\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tensor parallelism: 2 ranks (gloo), this process runs ranks 0..1" in proc.stderr
    assert proc.stdout.split("> ")[1].strip() == want.strip()
    assert processes_with(marker) == []


def test_one_script_under_torchrun_serves_from_rank_0_only(tiny, tmp_path):
    path, want = tiny
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torch's torchrun launcher is not installed beside this Python"
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env, marker = marked_env()
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["SERVED BY 0", f"REPLY {want!r}"]
    assert processes_with(marker) == []


def test_one_script_as_two_nodes_with_the_reference_variables_ends_both_at_exit(tiny, tmp_path):
    path, want = tiny
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env, marker = marked_env()
    with socket.socket() as probe:   # a free port for the head's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = dict(env, MISTRALRS_MN_GLOBAL_WORLD_SIZE="2")
    worker = subprocess.Popen([sys.executable, str(script), str(path), "no-close"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(common, MISTRALRS_MN_WORKER_ID="0",
                                       MISTRALRS_MN_WORKER_SERVER_ADDR=f"127.0.0.1:{port}"))
    try:
        head = subprocess.run([sys.executable, str(script), str(path), "no-close"], capture_output=True, text=True,
                              timeout=300, env=dict(common, MISTRALRS_MN_HEAD_NUM_WORKERS="1",
                                                    MISTRALRS_MN_HEAD_PORT=str(port)))
        worker_out, worker_err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert head.returncode == 0, head.stderr
    assert head.stdout.splitlines() == ["SERVED BY 0", f"REPLY {want!r}"]
    assert "shutdown message not delivered" not in head.stderr
    # The worker node was told to exit (not left to find the head gone) and printed nothing of the script's.
    assert worker.returncode == 0 and worker_out == "", worker_err
    assert "the head is gone" not in worker_err
    assert processes_with(marker) == []
