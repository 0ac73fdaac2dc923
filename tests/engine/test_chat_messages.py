"""Messages as chat templates expect them (engine/chat_messages.py), without a model."""

from __future__ import annotations

import pytest

from mistralrs.engine.chat_messages import ContentPartError, template_messages
from mistralrs.loader.chat_template import ChatTemplate

CALL = {"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}
# A template that prints tool calls itself (as Qwen's and Hermes' do) and one that concatenates the content.
PRINTS_CALLS = ("{% for m in messages %}{{ m.role }}:{% if m.content %}{{ m.content }}{% endif %}"
                "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments.x }}>"
                "{% endfor %}{{ '\\n' }}{% endfor %}")
CONCATENATES = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\\n' }}{% endfor %}"


def render(source: str, messages) -> str:
    template = ChatTemplate(source, bos_token=None, eos_token=None, unk_token=None)
    return template.render(template_messages(messages, "tool_calls" in source), add_generation_prompt=False)


def test_text_parts_are_joined_with_newlines():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert template_messages(messages, False) == [{"role": "user", "content": "a\nb"}]
    assert template_messages("hi", False) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "image", "image": "x"},
                                  {"type": "input_image", "image_url": "x"}])
def test_an_image_part_names_the_message_and_the_part(part):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    with pytest.raises(ContentPartError, match=r"^messages\[1\]\.content\[1\]: image input is not supported") as info:
        template_messages(messages, False)
    assert isinstance(info.value, ValueError) and info.value.param == "messages[1].content[1]"


def test_null_content_with_tool_calls_renders_with_either_kind_of_template():
    messages = [{"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "2"}]
    assert render(PRINTS_CALLS, messages) == "assistant:<call f 1>\ntool:2\n"
    assert render(CONCATENATES, messages) == 'assistant:{"name": "f", "arguments": {"x": 1}}\ntool:2\n'
    two = [{"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}]
    assert render(CONCATENATES, two) == 'assistant:[{"name": "f", "arguments": {"x": 1}}, ' \
                                        '{"name": "f", "arguments": {"x": 1}}]\n'
    assert messages[0]["content"] is None and CALL["function"]["arguments"] == '{"x": 1}'
