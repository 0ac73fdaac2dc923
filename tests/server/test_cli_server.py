"""`mistralrs serve` and `mistralrs-server`: argument parsing, unbuilt variants, interactive mode, and the real
default model (SmolLM2) served end to end by the console script."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys

import openai
import pytest

from mistralrs import Which
from mistralrs.cli import build_parser, build_server_parser, server_config_from_args, server_main, which_from_args
from tests.server.conftest import wait_until
from tests.terminal import prompts_shown


def test_reference_argument_order_selects_the_model():
    args = build_server_parser().parse_args(["--port", "1234", "-t", "--max-seqs", "4", "gguf", "-m", "DIR", "-f",
                                             "a.gguf b.gguf", "-t", "TOK"])
    assert (args.port, args.host, args.truncate_sequence, args.max_seqs) == (1234, "0.0.0.0", True, 4)
    which = which_from_args(args)
    assert which == Which.GGUF(quantized_model_id="DIR", quantized_filename=["a.gguf", "b.gguf"], tok_model_id="TOK")
    args = build_parser().parse_args(["serve", "--port", "8080", "--api-key", "k", "plain", "-m", "ID", "-a",
                                      "mistral", "--max-seq-len", "1024"])
    which = which_from_args(args)
    assert (args.command, args.host, args.api_key) == ("serve", "127.0.0.1", "k")
    assert (which.model_id, which.arch.name, which.auto_map_params.max_seq_len) == ("ID", "Mistral", 1024)
    assert build_parser().parse_args(["serve"]).model_kind is None   # the default model


def test_strict_model_name_option():
    assert server_config_from_args(build_server_parser().parse_args(["--strict-model-name"])).strict_model_name
    assert not server_config_from_args(build_parser().parse_args(["serve"])).strict_model_name


def test_server_options_make_the_server_config():
    config = server_config_from_args(build_parser().parse_args(["serve"]))
    assert (config.read_timeout_sec, config.max_connections) == (60.0, 512)
    assert (config.cors_origins, config.allowed_hosts, config.admin_without_key, config.docs) == ([], (), False, False)
    args = build_server_parser().parse_args(["--cors", "https://a.example, https://b.example", "--allowed-host",
                                             "api.example", "--allowed-host", "b.example",
                                             "--enable-admin-endpoints", "--docs", "plain", "-m", "ID"])
    config = server_config_from_args(args)
    assert config.cors_origins == ["https://a.example", "https://b.example"]
    assert (config.allowed_hosts, config.admin_without_key, config.docs) == (("api.example", "b.example"), True, True)
    args = build_parser().parse_args(["serve", "--read-timeout", "2.5", "--max-connections", "8",
                                      "--max-body-bytes", "1000"])
    config = server_config_from_args(args)
    assert (config.read_timeout_sec, config.max_connections, config.max_body_bytes) == (2.5, 8, 1000)
    with pytest.raises(ValueError, match="read_timeout_sec must be > 0"):
        server_config_from_args(build_parser().parse_args(["serve", "--read-timeout", "0"]))


@pytest.mark.parametrize("argv, message", [
    (["lora", "-a", "ADAPTERS", "-o", "order.json"], "order.json"),
    (["x-lora", "-x", "XLORA", "-o", "order.json"], "order.json"),
    (["ggml", "-t", "TOK", "-m", "DIR", "-f", "model.bin"], "model.bin"),
    (["vision-plain", "-m", "/no/such/vllama", "-a", "vllama"], "neither a local directory"),
    (["diffusion-plain", "-m", "/no/such/flux", "-a", "flux"], "neither a local directory"),
    (["toml", "-f", "model.toml"], "toml selector 'model.toml': cannot read it"),
    (["--isq", "Q9K", "plain", "-m", "ID"], "ISQ type Q9K unknown"),
])
def test_bad_or_unbuilt_selectors_exit_with_a_clear_error(argv, message):
    with pytest.raises(SystemExit) as caught:
        server_main(["--port", "1", *argv])
    assert message in str(caught.value.code)


def test_interactive_mode_chats_in_the_terminal(tiny_model, monkeypatch, capsys):
    # A message longer than the tiny model's context is an error the chat reports before going on.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\\system Be brief\n" + "x" * 600 + "\n\\exit\n"))
    server_main(["-i", "plain", "-m", str(tiny_model[0]), "-d", "f32"])
    out = capsys.readouterr().out
    assert "Chatting with" in out
    assert prompts_shown(out) == 4   # a reply, the \system line, the error, then the prompt at which \exit was typed
    assert "error: Prompt sequence length is greater than" in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_console_script_serves_the_default_model_and_stops_cleanly():
    port = free_port()
    script = os.path.join(os.path.dirname(sys.executable), "mistralrs-server")
    proc = subprocess.Popen([script, "--port", str(port), "--host", "127.0.0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, MISTRALRS_NO_PROGRESS="1"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def up() -> bool:
            try:
                return bool(client.models.list().data)
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                return False

        assert wait_until(up, timeout=180)
        assert client.models.list().data[0].id == "SmolLM2-135M-Instruct.Q4_1.gguf"   # not the package's path
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1.gguf", temperature=0, max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "What is the capital of Germany?"}])
        assert "Berlin" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
