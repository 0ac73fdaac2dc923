"""Chat template rendering against transformers' `apply_chat_template`, and the template helpers."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from mistralrs.loader.chat_template import ChatTemplate, read_chat_template_arg, select_named_templates
from mistralrs.loader.default_model import default_model_path
from mistralrs.formats.gguf_metadata import read_gguf_metadata

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer with <b>bold</b> & 'quotes'."},
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city <b>now</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# A Hermes-style tool template exercising loops, namespaces, tojson(indent), loop controls and whitespace control.
TOOL_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(found=false) %}
{%- if tools %}
<tools>
{%- for tool in tools %}
{{ tool | tojson(indent=2) }}
{%- endfor %}
</tools>
{%- endif %}
{% for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.found = true %}{% endif %}
    {%- if loop.index > 10 %}{% break %}{% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% if ns.found %}(sys){% endif %}
{% endif %}"""


@pytest.fixture(scope="module")
def smollm2_reference():
    import transformers
    path = default_model_path()
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    return read_gguf_metadata(str(path)), reference


def smollm2_template(metadata: dict) -> ChatTemplate:
    tokens = metadata["tokenizer.ggml.tokens"]
    return ChatTemplate(metadata["tokenizer.chat_template"], bos_token=tokens[metadata["tokenizer.ggml.bos_token_id"]],
                        eos_token=tokens[metadata["tokenizer.ggml.eos_token_id"]], unk_token=None)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with_system", "default_system"])
def test_smollm2_gguf_template_matches_transformers(smollm2_reference, messages, add_generation_prompt):
    metadata, reference = smollm2_reference
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = smollm2_template(metadata).render(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert rendered.startswith("<|im_start|>system\n")


def test_tool_template_matches_transformers(smollm2_reference):
    _, reference = smollm2_reference
    template = ChatTemplate(TOOL_TEMPLATE, bos_token="<s>", eos_token="</s>", unk_token=None)
    for tools in (TOOLS, None):
        expected = reference.apply_chat_template(CONVERSATION, tools=tools, chat_template=TOOL_TEMPLATE,
                                                 tokenize=False, add_generation_prompt=True,
                                                 bos_token="<s>", eos_token="</s>")
        assert template.render(CONVERSATION, tools=tools) == expected
    assert json.dumps(TOOLS[0], indent=2) in template.render(CONVERSATION, tools=TOOLS)


def render(source: str, messages=(), **kwargs) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>", unk_token="<unk>").render(list(messages), **kwargs)


def test_raise_exception_is_a_value_error():
    source = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}"
              "{% endif %}")
    with pytest.raises(ValueError, match="chat template error: Conversation must start with user"):
        render(source, [{"role": "assistant", "content": "hi"}])
    assert render(source, [{"role": "user", "content": "hi"}]) == ""


def test_strftime_now_and_date_string():
    today = datetime.now(timezone.utc)
    assert render("{{ strftime_now('%Y-%m') }}") == today.strftime("%Y-%m")
    assert render("{{ date_string }}") == today.strftime("%d, %B, %Y")


def test_tojson_indent_and_no_html_escaping():
    value = {"a": [1, 2], "b": "<tag> & 'q'", "é": None}
    assert render("{{ messages[0] | tojson }}", [value]) == json.dumps(value, ensure_ascii=False)
    assert render("{{ messages[0] | tojson(indent=4) }}", [value]) == json.dumps(value, ensure_ascii=False, indent=4)


def test_trim_and_lstrip_blocks():
    source = "start\n    {% if true %}\n  inside\n    {% endif %}\nend"
    assert render(source) == "start\n  inside\nend"


def test_loop_controls_and_string_methods():
    source = ("{% for m in messages %}{% if m['content'] == 'stop' %}{% break %}{% endif %}"
              "{% if m['content'].startswith('#') %}{% continue %}{% endif %}"
              "{{ m['content'].strip().upper() }};{% endfor %}")
    messages = [{"content": " a "}, {"content": "#skip"}, {"content": "b"}, {"content": "stop"}, {"content": "c"}]
    assert render(source, messages) == "A;B;"


def test_context_variables():
    assert render("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ add_generation_prompt }}") == \
        "<s>|</s>|<unk>|True"
    assert render("{{ add_generation_prompt }}", add_generation_prompt=False) == "False"
    assert ChatTemplate("[{{ bos_token }}]", bos_token=None, eos_token=None, unk_token=None).render([]) == "[]"
    tools_shown = "{% if tools is defined %}{{ tools | length }}{% else %}none{% endif %}"
    assert render(tools_shown, tools=None) == "none"
    assert render(tools_shown, tools=[]) == "none"
    assert render(tools_shown, tools=TOOLS) == "1"


def test_generation_block_renders_its_body():
    source = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    assert render(source, [{"content": "x"}, {"content": "y"}]) == "[x][y]"


def test_syntax_error_and_sandbox():
    with pytest.raises(ValueError, match="chat template error"):
        ChatTemplate("{% for m in messages %}", bos_token=None, eos_token=None, unk_token=None)
    with pytest.raises(ValueError, match="chat template error"):
        render("{{ messages.append(1) }}", [{"content": "x"}])
    with pytest.raises(ValueError, match="chat_template must be a non-empty string"):
        ChatTemplate("", bos_token=None, eos_token=None, unk_token=None)


def test_template_sources(tmp_path):
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps({"chat_template": "{{ 'x' }}", "bos_token": "<s>"}))
    assert read_chat_template_arg(str(json_file)) == ("{{ 'x' }}", {"chat_template": "{{ 'x' }}", "bos_token": "<s>"})
    jinja_file = tmp_path / "t.jinja"
    jinja_file.write_text("{{ 'y' }}")
    assert read_chat_template_arg(str(jinja_file)) == ("{{ 'y' }}", {})
    assert read_chat_template_arg("{{ 'z' }}") == ("{{ 'z' }}", {})
    with pytest.raises(ValueError, match="neither an existing file"):
        read_chat_template_arg("chatml.json")
    assert select_named_templates("t", "f") == {"default": "t"}
    assert select_named_templates(None, "f") == {}
    with pytest.raises(ValueError, match="f: chat_template must be a string or a list"):
        select_named_templates(3, "f")
