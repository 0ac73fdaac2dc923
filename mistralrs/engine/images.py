"""Generated images as the API returns them (REFERENCE §1.8): a PNG saved in the working directory (`Url`) or a
`data:image/png;base64,...` string (`B64Json`)."""

from __future__ import annotations

import base64
import io
import os
import uuid

from PIL import Image

from mistralrs.api.enums import ImageGenerationResponseFormat
from mistralrs.api.responses import ImageChoice, ImageGenerationResponse


def parse_response_format(response_format) -> ImageGenerationResponseFormat:
    """An `ImageGenerationResponseFormat` member or one of its spellings ("url", "b64_json", "Url", "B64Json");
    ValueError naming `response_format` otherwise."""
    try:
        return ImageGenerationResponseFormat.from_str(response_format)
    except (TypeError, ValueError):
        raise ValueError(f"response_format must be ImageGenerationResponseFormat.Url or .B64Json (or 'url' / "
                         f"'b64_json'), got {response_format!r}") from None


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_response(image: Image.Image, response_format: ImageGenerationResponseFormat,
                   directory: str = ".") -> ImageGenerationResponse:
    """The response for one generated image: `Url` writes `image-generation-<uuid4>.png` into `directory` and
    returns that path (relative when `directory` is "."), `B64Json` returns the PNG as a data URL."""
    if response_format is ImageGenerationResponseFormat.Url:
        path = os.path.join(directory, f"image-generation-{uuid.uuid4()}.png") if directory != "." else \
            f"image-generation-{uuid.uuid4()}.png"
        with open(path, "wb") as f:
            f.write(_png_bytes(image))
        return ImageGenerationResponse(data=[ImageChoice(url=path, b64_json=None)])
    encoded = base64.b64encode(_png_bytes(image)).decode("ascii")
    return ImageGenerationResponse(data=[ImageChoice(url=None, b64_json=f"data:image/png;base64,{encoded}")])
