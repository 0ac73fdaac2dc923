"""Chat prompt tokenization: the BOS rule (issue 11, item 2)."""

from __future__ import annotations

import pytest
from tokenizers import processors

from mistralrs.engine.input_processor import InputProcessor
from mistralrs.loader.tokenizer import TokenizerBundle
from tests.tiny_models import CHATML, EOS_TOKEN_ID, char_tokenizer

BOS = "<|endoftext|>"


def _inputs(template: str, add_bos_token: bool) -> InputProcessor:
    tokenizer = char_tokenizer()
    bos_id = tokenizer.token_to_id(BOS)
    if add_bos_token:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    bundle = TokenizerBundle(tokenizer=tokenizer, bos_token=BOS, eos_token="<|im_end|>", unk_token=None,
                             eos_token_ids={EOS_TOKEN_ID}, chat_template=template, add_bos_token=add_bos_token)
    return InputProcessor(bundle, max_model_len=512)


@pytest.mark.parametrize("template", [CHATML, "{{ bos_token }}" + CHATML])
@pytest.mark.parametrize("add_bos_token", [True, False])
def test_bos_in_front_once_when_the_tokenizer_adds_one(template, add_bos_token):
    inputs = _inputs(template, add_bos_token)
    bos_id = inputs.tokenizer.token_to_id(BOS)
    messages = [{"role": "user", "content": "hi"}]
    rendered = inputs.chat_template.render(messages, add_generation_prompt=True)
    body = inputs.tokenizer.encode(rendered.removeprefix(BOS), add_special_tokens=False).ids
    assert bos_id not in body
    wants_bos = add_bos_token or template.startswith("{{ bos_token }}")
    assert inputs.chat_prompt_ids(messages) == [bos_id] * wants_bos + body
