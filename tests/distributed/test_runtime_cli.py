"""`mistralrs chat --tp-size 2` on CPU ranks: the same reply as one process, and no rank left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

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


def test_chat_with_tp_size_2_replies_as_one_process(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")
    alone = Runner(Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32))
    want = alone.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Hello there"}], model="m", max_tokens=12,
        temperature=0.0)).choices[0].message.content
    alone.close()
    marker = f"MISTRALRS_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(os.environ, MISTRALRS_NO_PROGRESS="1", MISTRALRS_TEST_MARKER=marker.partition("=")[2])
    env.pop("MISTRALRS_TP_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "mistralrs", "-v", "chat", "--tp-size", "2", "--temperature", "0",
                           "--max-tokens", "12", "plain", "-m", str(tmp_path), "-d", "f32"],
                          input="Hello there\n/exit\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tensor parallelism: 2 ranks (gloo), this process runs ranks 0..1" in proc.stderr
    assert proc.stdout.split("> ")[1].strip() == want.strip()
    assert processes_with(marker) == []
