"""The `mistralrs` command, driven as a user would: a chat on standard input with the default model."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, MISTRALRS_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "mistralrs", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


def test_chat_with_default_model_streams_replies_and_remembers_the_conversation():
    # "What is the capital of France?" starts with a near-tie (margin 0.08) that bf16 rounding can flip.
    proc = run_cli("chat", "--temperature", "0", "--max-tokens", "24",
                   stdin="Tell me the capital of France.\nAnd what language is spoken there?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stdout
    replies = proc.stdout.split("> ")[1:]
    assert len(replies) == 3          # two answers, then the prompt at which /exit was typed
    assert "Paris" in replies[0]
    assert "French" in replies[1]


def test_bad_model_paths_are_clear_errors(tmp_path):
    proc = run_cli("chat", "gguf", "-m", "/nonexistent", "-f", "model.gguf")
    assert proc.returncode != 0
    assert "/nonexistent" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("chat", "gguf", "-m", str(tmp_path), "-f", "missing.gguf")
    assert proc.returncode != 0
    assert "missing.gguf" in proc.stderr and "Traceback" not in proc.stderr
