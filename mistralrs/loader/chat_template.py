"""Chat templates: Jinja templates that turn a list of messages into one prompt string (REFERENCE §8.8).

Rendering follows the Hugging Face convention (`transformers.apply_chat_template`), which is what the
templates on the Hub are written and tested against: a sandboxed, immutable Jinja environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now`, a
`tojson` filter that takes `indent` and does not HTML-escape, and a `{% generation %}` block that renders
its body. Sources of templates (files, JSON, `tokenizer_config.json` lists) are read here too.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mistralrs.dependencies import import_dependency

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment


@functools.cache
def _jinja() -> ModuleType:
    """The jinja2 package with the submodules used here, imported when the first template is compiled (a model
    without a chat template, and `import mistralrs`, leave it out)."""
    jinja2 = import_dependency("jinja2")  # the installed package, never a user's file of that name
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    return jinja2


@functools.cache
def _generation_block() -> type:
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders the body."""
    jinja2 = _jinja()

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return caller()

    return GenerationBlock


def _raise_exception(message: str) -> None:
    raise _jinja().exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(timezone.utc).strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    jinja2 = _jinja()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_generation_block(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None,
                 unk_token: str | None) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError(f"chat_template must be a non-empty string, got {source!r}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        try:
            self._template = _environment().from_string(source)
        except _jinja().TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt for `messages`; `tools` is visible to the template only when non-empty."""
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "unk_token": self.unk_token or "",
            "date_string": datetime.now(timezone.utc).strftime("%d, %B, %Y"),
        }
        if tools:
            context["tools"] = tools
        try:
            return self._template.render(**context)
        except _jinja().TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


def read_jinja_file(path: str) -> str:
    """The text of a `jinja_explicit` template file; only `.jinja` files are accepted."""
    if not path.endswith(".jinja"):
        raise ValueError(f"jinja_explicit must be a path to a .jinja file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"jinja_explicit: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_chat_template_arg(arg: str) -> tuple[str | list | None, dict[str, Any]]:
    """Resolve the `chat_template` argument: a JSON file, a `.jinja` file, or a literal template string.

    Returns `(template, config)`: the template (a string, a list of named templates, or None when a JSON file
    has none) and the JSON object itself, whose `bos_token`/`eos_token`/`unk_token` fill in missing tokens.
    """
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            text = f.read()
        if not arg.endswith(".json"):
            return text, {}
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"chat_template: {arg!r} is not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"chat_template: {arg!r} must hold a JSON object with a \"chat_template\" key")
        return config.get("chat_template"), config
    if "{{" in arg or "{%" in arg:
        return arg, {}
    raise ValueError(f"chat_template: {arg!r} is neither an existing file (.json or .jinja) nor a Jinja template "
                     "string")


def select_named_templates(value: str | list | None, field: str) -> dict[str, str]:
    """Normalise a `chat_template` value to {name: template}: a string is {"default": it}.

    A list holds `{"name": ..., "template": ...}` entries (tokenizer_config.json with several templates).
    """
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                    not isinstance(entry.get("template"), str):
                raise ValueError(f"{field}: each entry of a chat_template list must be "
                                 f"{{\"name\": str, \"template\": str}}, got {entry!r}")
            named[entry["name"]] = entry["template"]
        return named
    raise ValueError(f"{field}: chat_template must be a string or a list of named templates, got "
                     f"{type(value).__name__}")
