"""Image loading (mistralrs/vision/images.py): every source of REFERENCE 1.7, the policy, the limits, the errors."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from mistralrs.vision.images import (
    ImageInputError, ImageSourcePolicy, check_image_count, image_digest, load_image,
)

WHERE = "messages[2].content[1]"
LIBRARY = ImageSourcePolicy.for_library()


def png_bytes(size=(12, 7), color=(200, 10, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        body = png_bytes() if self.path == "/image.png" else b"not an image"
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def check_red(image: Image.Image, size=(12, 7)) -> None:
    assert image.mode == "RGB" and image.size == size and image.getpixel((0, 0)) == (200, 10, 30)


def test_every_source_of_the_reference(tmp_path, http_url):
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes())
    encoded = base64.b64encode(png_bytes()).decode()
    sources = [Image.new("RGBA", (12, 7), (200, 10, 30, 255)), png_bytes(), f"{http_url}/image.png",
               f"data:image/png;base64,{encoded}", path.as_uri(), str(path), encoded]
    for source in sources:
        check_red(load_image(source, LIBRARY, WHERE))


@pytest.mark.parametrize("source,message", [
    ("data:image/png,abc", "malformed data URL"),
    ("data:text/plain;base64,aGk=", "malformed data URL"),
    ("data:image/png;base64,@@@", "neither a URL, an existing file nor valid base64"),
    ("/no/such/file.png", "neither a URL, an existing file nor valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "not a readable image"),
    ("ftp://host/x.png", "unsupported image URL scheme 'ftp'"),
    ("", "non-empty string"),
    (42, "non-empty string"),
])
def test_bad_sources_name_the_part(source, message):
    with pytest.raises(ImageInputError, match=rf"^messages\[2\]\.content\[1\]: .*{message}") as info:
        load_image(source, LIBRARY, WHERE)
    assert info.value.param == WHERE and info.value.http_status == 400 and isinstance(info.value, ValueError)


def test_unreachable_and_failing_urls(http_url):
    with socket.socket() as probe:   # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    for url, message in [(f"http://127.0.0.1:{closed}/x.png", "cannot fetch"),
                         (f"{http_url}/missing", "cannot fetch"), (f"{http_url}/text", "not a readable image")]:
        with pytest.raises(ImageInputError, match=message):
            load_image(url, LIBRARY, WHERE)


def test_a_silent_server_times_out():
    with socket.socket() as silent:   # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        policy = ImageSourcePolicy(timeout_s=0.3)
        with pytest.raises(ImageInputError, match="cannot fetch the image URL"):
            load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", policy, WHERE)


def test_byte_and_pixel_limits(tmp_path, http_url):
    data = png_bytes()
    small = ImageSourcePolicy(max_bytes=len(data) - 1)
    path = tmp_path / "red.png"
    path.write_bytes(data)
    for source in (data, f"{http_url}/image.png", str(path), base64.b64encode(data).decode()):
        with pytest.raises(ImageInputError, match="bytes"):
            load_image(source, small, WHERE)
    few_pixels = ImageSourcePolicy(max_pixels=12 * 7 - 1)
    for source in (data, Image.new("RGB", (12, 7))):
        with pytest.raises(ImageInputError, match="12x7 pixels; at most 83 pixels"):
            load_image(source, few_pixels, WHERE)
    check_red(load_image(data, ImageSourcePolicy(max_bytes=len(data), max_pixels=84), WHERE))


def test_the_server_policy_reads_no_file_unless_a_directory_is_allowed(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (allowed / "in.png").write_bytes(png_bytes())
    (other / "out.png").write_bytes(png_bytes())
    (allowed / "escape.png").symlink_to(other / "out.png")
    closed = ImageSourcePolicy.for_server(None)
    for source in (str(allowed / "in.png"), (allowed / "in.png").as_uri()):
        with pytest.raises(ImageInputError, match="local files and file:// URLs are not accepted"):
            load_image(source, closed, WHERE)
    opened = ImageSourcePolicy.for_server(str(allowed))
    check_red(load_image((allowed / "in.png").as_uri(), opened, WHERE))
    check_red(load_image(str(allowed / "in.png"), opened, WHERE))
    for source in (str(other / "out.png"), str(allowed / "escape.png"), f"{allowed}/../other/out.png"):
        with pytest.raises(ImageInputError, match="outside the allowed image directory"):
            load_image(source, opened, WHERE)


def test_remote_urls_can_be_refused(http_url):
    with pytest.raises(ImageInputError, match="remote image URLs are not accepted"):
        load_image(f"{http_url}/image.png", ImageSourcePolicy(allow_remote=False), WHERE)


def test_image_count_names_the_first_part_over_the_limit():
    wheres = [f"messages[0].content[{j}]" for j in range(4)]
    check_image_count(wheres, ImageSourcePolicy(max_images=4), None)
    with pytest.raises(ImageInputError, match=r"^messages\[0\]\.content\[3\]: 4 images in one request; at most 3"):
        check_image_count(wheres, ImageSourcePolicy(max_images=8), 3)


def test_digest_is_the_pixels():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    assert image_digest([red]) == image_digest([Image.open(io.BytesIO(png_bytes((4, 4), (255, 0, 0))))
                                                .convert("RGB")])
    assert len({image_digest([red]), image_digest([blue]), image_digest([red, blue]), image_digest([blue, red])}) == 4


@pytest.mark.parametrize("kwargs", [dict(timeout_s=0), dict(max_bytes=0), dict(max_pixels=0), dict(max_images=0),
                                    dict(allow_local_files=False, allowed_dir="/tmp")])
def test_policy_values_are_checked(kwargs):
    with pytest.raises(ValueError, match="ImageSourcePolicy"):
        ImageSourcePolicy(**kwargs)
