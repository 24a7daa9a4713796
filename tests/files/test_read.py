"""Reading attached files: images, PDFs and text, and every refusal (core.files.read)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from core.errors import FileRefusedError
from core.files.read import ImagePart, TextPart, read_file
from tests.files.samples import BROKEN_PDF, NOT_AN_IMAGE, encrypted_pdf, png, text_pdf


def read(data: bytes, name: str, mimetype: str = "", **kw: int) -> ImagePart | TextPart:
    return read_file(
        data,
        name=name,
        mimetype=mimetype,
        max_pixels=kw.get("max_pixels", 1_000_000),
        max_chars=kw.get("max_chars", 10_000),
    )


def decoded(part: ImagePart) -> Image.Image:
    head, _, body = part.data_url.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(body)))


def test_an_image_becomes_an_image_part_sniffed_from_its_bytes_whatever_its_name() -> None:
    part = read(png(64, 48), "holiday.txt", "text/plain")
    assert isinstance(part, ImagePart)
    assert (part.width, part.height, part.downscaled) == (64, 48, False)
    assert decoded(part).size == (64, 48)
    assert part.content_part()["type"] == "image_url"


def test_a_large_image_is_downscaled_to_the_pixel_limit_keeping_its_shape() -> None:
    part = read(png(2000, 1000), "big.png", "image/png", max_pixels=200_000)
    assert isinstance(part, ImagePart) and part.downscaled
    w, h = decoded(part).size
    assert w * h <= 200_000 and abs(w / h - 2.0) < 0.02


def test_an_image_with_transparency_stays_png_and_a_photo_becomes_jpeg() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(out, "PNG")
    assert read(out.getvalue(), "a.png").data_url.startswith("data:image/png;")  # type: ignore[union-attr]
    assert read(png(), "b.png").data_url.startswith("data:image/jpeg;")  # type: ignore[union-attr]


def test_a_png_name_on_bytes_that_are_not_an_image_is_refused_clearly() -> None:
    with pytest.raises(FileRefusedError, match=r"photo\.png is not an image"):
        read(NOT_AN_IMAGE, "photo.png", "image/png")


def test_a_truncated_image_is_refused_as_damaged() -> None:
    with pytest.raises(FileRefusedError, match="damaged"):
        read(png(300, 300)[:200], "cut.png", "image/png")


def test_a_pdf_becomes_its_text_page_by_page() -> None:
    part = read(text_pdf("Quarterly revenue rose", "Second page text"), "report.pdf")
    assert isinstance(part, TextPart) and part.kind == "pdf"
    assert "Quarterly revenue rose" in part.text and "Second page text" in part.text


def test_a_pdf_that_cannot_be_read_is_refused_clearly() -> None:
    with pytest.raises(FileRefusedError, match=r"report\.pdf could not be read"):
        read(BROKEN_PDF, "report.pdf", "application/pdf")


def test_a_pdf_name_on_other_bytes_is_refused_as_not_a_pdf() -> None:
    with pytest.raises(FileRefusedError, match="not a valid PDF"):
        read(b"\x00\x01binary", "scan.pdf", "application/pdf")


def test_a_password_protected_pdf_is_refused_clearly() -> None:
    with pytest.raises(FileRefusedError, match="password-protected"):
        read(encrypted_pdf("secret plans"), "locked.pdf", "application/pdf")


def test_text_files_are_decoded_utf8_or_utf16_and_binary_is_refused() -> None:
    part = read("naïve café\r\nline two".encode(), "notes.txt", "text/plain")
    assert isinstance(part, TextPart) and part.text == "naïve café\nline two"
    utf16 = read("unicode ✓".encode("utf-16"), "u.txt")
    assert isinstance(utf16, TextPart) and utf16.text == "unicode ✓"
    with pytest.raises(FileRefusedError, match="not a file type I can read"):
        read(b"\x7fELF\x02\x01\x00\x00binary", "tool", "application/octet-stream")


def test_long_text_is_cut_just_past_the_limit_so_the_caller_can_tell() -> None:
    part = read(b"x" * 50_000, "big.txt", "text/plain", max_chars=1000)
    assert isinstance(part, TextPart) and len(part.text) == 1001
