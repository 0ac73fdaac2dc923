"""Reading the images of a request: every source of REFERENCE §1.7, bounded, under an explicit policy.

`load_image(source, policy, where)` accepts, in this order (as the reference does):
- a `PIL.Image.Image` (the Python API may pass one) or raw `bytes`;
- `http://` / `https://` URLs, fetched with `policy.timeout_s` and at most `policy.max_bytes` read;
- `data:image/...;base64,...` URLs;
- `file://` URLs and existing local paths, only when `policy.allow_local_files` (and, with `policy.allowed_dir`,
  only below that directory after resolving symlinks);
- anything else is taken as raw base64 (the format detected from the bytes).
Every failure is an `ImageInputError` (a ValueError; HTTP 400) naming the message and part (`where`).
Limits: `policy.max_bytes` encoded bytes and `policy.max_pixels` pixels per image (checked from the header,
before decoding), `policy.max_images` images per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # encoded bytes of one image (a 4K PNG is ~10 MiB)
DEFAULT_MAX_PIXELS = 40_000_000  # pixels of one image (7680 x 5200); PIL's own bomb check starts at ~89M
DEFAULT_MAX_IMAGES = 16  # images per request
DEFAULT_TIMEOUT_S = 10.0  # seconds for a remote image (connect and each read)


class ImageInputError(ValueError):
    """An image part that cannot be used (unreadable, refused, over a limit). HTTP: 400 with `param`."""

    http_status = 400  # the server's status for it
    error_code = "invalid_image"  # the server's `code` for it

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param  # where the part is: "messages[i].content[j]"


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Which image sources a front door accepts, and the limits on each image."""

    allow_local_files: bool = True  # file:// URLs and local paths (the Python API: yes; the server: only if asked)
    allowed_dir: str | None = None  # with local files: only paths below this directory (None: anywhere)
    allow_remote: bool = True  # http(s) URLs
    timeout_s: float = DEFAULT_TIMEOUT_S  # remote fetch timeout
    max_bytes: int = DEFAULT_MAX_BYTES  # most encoded bytes per image
    max_pixels: int = DEFAULT_MAX_PIXELS  # most pixels (width x height) per image
    max_images: int = DEFAULT_MAX_IMAGES  # most images per request

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"ImageSourcePolicy.timeout_s must be positive, got {self.timeout_s!r}")
        for name in ("max_bytes", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageSourcePolicy.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.allowed_dir is not None and not self.allow_local_files:
            raise ValueError("ImageSourcePolicy.allowed_dir needs allow_local_files")

    @classmethod
    def for_library(cls) -> ImageSourcePolicy:
        """The Python API: local paths and file:// URLs are read as the reference reads them."""
        return cls()

    @classmethod
    def for_server(cls, allowed_dir: str | None) -> ImageSourcePolicy:
        """The HTTP server: no local file unless `allowed_dir` names the one directory clients may read below."""
        if allowed_dir is None:
            return cls(allow_local_files=False)
        return cls(allow_local_files=True, allowed_dir=str(Path(allowed_dir).resolve()))


def load_image(source: object, policy: ImageSourcePolicy, where: str) -> Image.Image:
    """The RGB image `source` names (see the module docstring); ImageInputError naming `where` otherwise."""
    from PIL import Image  # imported here: an engine that never reads an image leaves PIL out

    if isinstance(source, Image.Image):
        _check_pixels(source, policy, where)
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), policy, where)
    if not isinstance(source, str) or not source:
        raise ImageInputError(f"{where}: an image URL must be a non-empty string, got {source!r:.100}", where)
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source or source.startswith("data:") else ""
    if scheme in ("http", "https"):
        return _decode(_fetch(source, policy, where), policy, where)
    if scheme == "data":
        return _decode(_data_url_bytes(source, where), policy, where)
    if scheme == "file":
        return _decode(_read_local(urllib.request.url2pathname(urllib.parse.urlsplit(source).path), policy, where),
                       policy, where)
    if scheme:
        raise ImageInputError(f"{where}: unsupported image URL scheme {scheme!r} (use http(s), data: or file://)",
                              where)
    if _looks_like_path(source):
        return _decode(_read_local(source, policy, where), policy, where)
    return _decode(_base64_bytes(source, where), policy, where)


def image_digest(images: list[Image.Image]) -> str:
    """sha256 over the images' sizes, modes and pixels, in order (the prefix-cache salt of a request)."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}:{image.width}x{image.height}|".encode())
        digest.update(image.tobytes())
    return "image:" + digest.hexdigest()


def check_image_count(wheres: list[str], policy: ImageSourcePolicy, model_limit: int | None) -> None:
    """ImageInputError naming the first image part over the limit, when a request carries more images (one
    `where` each) than the policy or the model accepts."""
    limit = min(policy.max_images, model_limit) if model_limit is not None else policy.max_images
    if len(wheres) > limit:
        raise ImageInputError(f"{wheres[limit]}: {len(wheres)} images in one request; at most {limit} are "
                              "accepted", wheres[limit])


def _looks_like_path(source: str) -> bool:
    """A string the reference reads from disk: an existing file (checked without following it anywhere else)."""
    if len(source) > 4096 or "\0" in source:
        return False
    try:
        return os.path.isfile(source)
    except (OSError, ValueError):
        return False


def _read_local(path: str, policy: ImageSourcePolicy, where: str) -> bytes:
    if not policy.allow_local_files:
        raise ImageInputError(f"{where}: local files and file:// URLs are not accepted here (start the server "
                              "with --allowed-image-dir to allow one directory)", where)
    resolved = Path(path).resolve()
    if policy.allowed_dir is not None and not resolved.is_relative_to(policy.allowed_dir):
        raise ImageInputError(f"{where}: the image path is outside the allowed image directory", where)
    try:
        size = resolved.stat().st_size
        if size > policy.max_bytes:
            raise ImageInputError(f"{where}: the image file has {size} bytes; at most {policy.max_bytes} are "
                                  "accepted", where)
        return resolved.read_bytes()
    except OSError as exc:
        raise ImageInputError(f"{where}: cannot read the image file ({exc.strerror or type(exc).__name__})",
                              where) from None


def _fetch(url: str, policy: ImageSourcePolicy, where: str) -> bytes:
    if not policy.allow_remote:
        raise ImageInputError(f"{where}: remote image URLs are not accepted here", where)
    request = urllib.request.Request(url, headers={"User-Agent": "mistralrs-python"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ImageInputError(f"{where}: cannot fetch the image URL ({reason})", where) from None
    if len(data) > policy.max_bytes:
        raise ImageInputError(f"{where}: the image at the URL is over {policy.max_bytes} bytes", where)
    return data


def _data_url_bytes(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ImageInputError(f"{where}: malformed data URL (expected data:image/<format>;base64,<data>)", where)
    return _base64_bytes(payload, where)


def _base64_bytes(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{where}: the image is neither a URL, an existing file nor valid base64 data",
                              where) from None


def _check_pixels(image: Image.Image, policy: ImageSourcePolicy, where: str) -> None:
    if image.width * image.height > policy.max_pixels:
        raise ImageInputError(f"{where}: the image has {image.width}x{image.height} pixels; at most "
                              f"{policy.max_pixels} pixels are accepted", where)
    if image.width < 1 or image.height < 1:
        raise ImageInputError(f"{where}: the image is empty", where)


def _decode(data: bytes, policy: ImageSourcePolicy, where: str) -> Image.Image:
    """The RGB image encoded in `data`; its size is checked from the header before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_bytes:
        raise ImageInputError(f"{where}: the image has {len(data)} bytes; at most {policy.max_bytes} are accepted",
                              where)
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image, policy, where)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageInputError):
            raise
        raise ImageInputError(f"{where}: the data is not a readable image ({type(exc).__name__})", where) from None
