"""The `mistralrs` command, driven as a user would: a chat on standard input with the default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from mistralrs import Which
from mistralrs.cli import build_parser, chat_sampling, recommended_sampling


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
    assert "Sampling: temperature 0.0, top_p 0.9, max_tokens 24 (command line and SmolLM2 model card)" in proc.stdout
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


def banner_seed(stdout: str) -> int:
    return int(re.search(r"; seed (\d+) \(", stdout).group(1))


def test_chat_samples_as_the_model_card_says_with_a_fresh_seed_per_session():
    """`make chat` used temperature 0.7 and seed 0 in every session, so its first answer was the same wrong one."""
    first, second = run_cli("chat", stdin="/exit\n"), run_cli("chat", stdin="/exit\n")
    for proc in (first, second):
        assert proc.returncode == 0, proc.stderr
        assert "Sampling: temperature 0.2, top_p 0.9, max_tokens 512 (SmolLM2 model card); seed " in proc.stdout
        assert "(fresh this session; --seed N repeats it)" in proc.stdout
    assert banner_seed(first.stdout) != banner_seed(second.stdout)
    fixed = run_cli("chat", "--seed", "7", "--top-p", "0.5", stdin="/exit\n")
    assert "Sampling: temperature 0.2, top_p 0.5, max_tokens 512 (command line and SmolLM2 model card); seed 7 " \
           "(--seed)" in fixed.stdout


def test_recommended_sampling_of_a_model_directory(tmp_path):
    which = Which.Plain(model_id=str(tmp_path))
    assert recommended_sampling(which) == ({"temperature": 0.7, "top_p": 0.9}, "defaults")
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                  "eos_token_id": 2}))
    assert recommended_sampling(which) == ({"temperature": 0.6, "top_p": 0.95, "top_k": 20}, "generation_config.json")
    args = build_parser().parse_args(["chat", "--temperature", "0.1", "--top-p", "0.5"])
    assert chat_sampling(args, which) == ({"temperature": 0.1, "top_p": 0.5, "top_k": 20, "max_tokens": 512},
                                          "command line and generation_config.json")
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert recommended_sampling(which) == ({"temperature": 0.0}, "generation_config.json: greedy")
