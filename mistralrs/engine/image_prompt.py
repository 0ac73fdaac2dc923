"""The front door's image side: a chat request with image parts -> prompt ids with the model's image tokens, and
the preprocessed images (`ImageInputs`) the engine request carries.

Where the images go in the prompt:
- the request's text already holds the model's placeholder once per image (the reference's way for LLaVa,
  Phi-3-V, ...): those are the images' places, in order; the image parts themselves print nothing;
- otherwise, when the chat template prints a placeholder per `{"type": "image"}` part (Idefics, Gemma 3, Qwen2-VL,
  Mistral 3 templates), its output is used;
- otherwise the placeholder is written in each image part's place, on its own line among the message's text parts.
Any other count of typed placeholders is a ValueError. The processor then expands each placeholder into the
image's tokens; typed placeholder text counts as the placeholder (the special tokens of the expansion are the
processor's, never the request's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mistralrs.engine.chat_messages import image_parts, placeholders_typed, template_messages
from mistralrs.engine.input_processor import InputProcessor
from mistralrs.vision.base import ImageInputs, VisionProcessor
from mistralrs.vision.images import ImageInputError, ImageSourcePolicy, check_image_count, load_image


class _NotPrinted(Exception):
    """The chat template did not print one placeholder per image part."""


class ImagePrompter:
    """Turns a vision model's chat requests into prompt ids and `ImageInputs` (see the module docstring)."""

    def __init__(self, processor: VisionProcessor, inputs: InputProcessor, image_token_id: int) -> None:
        self.processor = processor
        self.inputs = inputs
        self.image_token_id = image_token_id  # the token the model replaces by image features
        placeholder_ids = inputs.tokenizer.encode(processor.image_placeholder, add_special_tokens=False).ids
        self.keep_ids = frozenset(placeholder_ids)  # the placeholder's tokens, kept special when typed

    def load_images(self, messages: Any, policy: ImageSourcePolicy) -> ImageInputs | None:
        """The request's images, read under `policy` and preprocessed; None without image parts."""
        parts = image_parts(messages)
        if not parts:
            return None
        check_image_count([part.where for part in parts], policy, self.processor.max_images)
        images = [load_image(part.source, policy, part.where) for part in parts]
        try:
            return self.processor.preprocess(images)
        except ValueError as exc:
            raise ImageInputError(f"{parts[0].where}: {exc}", parts[0].where) from None

    def chat_prompt_ids(self, messages: Any, tools: list[dict] | None, prints_tool_calls: bool, keep_tail: bool,
                        images: ImageInputs) -> list[int]:
        """The prompt ids of a request with `images` (see the module docstring)."""
        placeholder = self.processor.image_placeholder
        typed = placeholders_typed(messages, self.processor.count_placeholders)
        if typed not in (0, images.num_images):
            raise ValueError(f"messages: the text holds {typed} image placeholders {placeholder!r} for "
                             f"{images.num_images} images; write one per image, or none to let them be placed")
        if typed == 0:
            native = template_messages(messages, prints_tool_calls, image_text="", native_images=True)
            try:
                return self._encode(native, tools, keep_tail, self._expand(images, strict=False))
            except _NotPrinted:
                pass
        rendered = template_messages(messages, prints_tool_calls, image_text="" if typed else placeholder)
        return self._encode(rendered, tools, keep_tail, self._expand(images, strict=True))

    def _encode(self, messages: list[dict], tools: list[dict] | None, keep_tail: bool,
                expand: Callable[[str], str]) -> list[int]:
        return self.inputs.chat_prompt_ids(messages, tools, keep_tail=keep_tail, keep_ids=self.keep_ids,
                                           transform=expand)

    def _expand(self, images: ImageInputs, strict: bool) -> Callable[[str], str]:
        """The rendered prompt with each placeholder expanded; `strict`: a count that differs from the images is
        a ValueError, else `_NotPrinted` (the template printed no placeholder per image)."""
        placeholder = self.processor.image_placeholder

        def expand(text: str) -> str:
            count = self.processor.count_placeholders(text)
            if count != images.num_images:
                if not strict:
                    raise _NotPrinted
                raise ValueError(f"messages: the chat template's prompt holds {count} image placeholders "
                                 f"{placeholder!r} for {images.num_images} images")
            return self.processor.expand_prompt(text, images)

        return expand

    def check_prompt(self, prompt_ids: list[int], images: ImageInputs) -> None:
        """ValueError when the (possibly truncated) prompt does not hold every image token of `images`."""
        found = prompt_ids.count(self.image_token_id)
        if found != images.total_image_tokens:
            raise ValueError(f"the prompt holds {found} image tokens for {images.total_image_tokens} image features "
                             "(a truncated prompt must keep its images whole; shorten the conversation)")
