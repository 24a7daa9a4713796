"""An attached file's bytes as what the model gets: an image part or text.

The type is sniffed from the bytes, never taken from the name or the declared type:
Pillow decides what is an image, ``%PDF-`` what is a PDF (read with pypdf), UTF-8
(or UTF-16 with a BOM) what is text. A file whose name or type claims an image but
whose bytes are not one is refused. Images are re-encoded (which drops their
metadata, such as a photo's location) and downscaled to ``max_pixels``.

These functions are CPU-bound and synchronous; callers run them in a thread.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError
from pypdf import PdfReader
from pypdf.errors import PyPdfError

from core.errors import FileRefusedError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif"}
)
# Images larger than this are refused before they are decoded (decompression bombs).
MAX_DECODE_PIXELS = 100_000_000
JPEG_QUALITY = 85


@dataclass(frozen=True)
class ImagePart:
    """An image ready for the model: a ``data:`` URL and its final size."""

    data_url: str
    width: int
    height: int
    downscaled: bool

    def content_part(self) -> dict[str, object]:
        """The Chat Completions content part."""
        return {"type": "image_url", "image_url": {"url": self.data_url}}


@dataclass(frozen=True)
class TextPart:
    """Text taken from a file (possibly empty: a PDF with no text layer)."""

    text: str
    kind: str  # "text" or "pdf"


def claims_image(name: str, mimetype: str) -> bool:
    """Whether the name or the declared type says the file is an image."""
    return mimetype.lower().startswith("image/") or PurePosixPath(name.lower()).suffix in (
        IMAGE_SUFFIXES
    )


def read_file(
    data: bytes, *, name: str, mimetype: str, max_pixels: int, max_chars: int
) -> ImagePart | TextPart:
    """What the model gets of one file.

    Raises:
        FileRefusedError: not a usable image, PDF or text file; the reason is safe to show.
    """
    if data.startswith(b"%PDF-"):
        return TextPart(read_pdf(data, name=name, max_chars=max_chars), "pdf")
    image = _open_image(data, name)
    if image is not None:
        return to_image_part(image, name=name, max_pixels=max_pixels)
    if claims_image(name, mimetype):
        raise FileRefusedError(f"{name} is not an image: its content is not a picture I can read.")
    if mimetype.lower() == "application/pdf" or name.lower().endswith(".pdf"):
        raise FileRefusedError(f"{name} could not be read: it is not a valid PDF.")
    text = decode_text(data)
    if text is None:
        raise FileRefusedError(
            f"{name} is not a file type I can read (images, PDFs and text files are)."
        )
    return TextPart(text[: max_chars + 1], "text")


def _open_image(data: bytes, name: str) -> Image.Image | None:
    """The image in ``data``, not yet decoded; ``None`` if Pillow does not know it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise FileRefusedError(f"{name} is too large an image to read.") from e
    if image.width * image.height > MAX_DECODE_PIXELS:
        raise FileRefusedError(
            f"{name} is too large an image to read ({image.width}×{image.height} pixels)."
        )
    return image


def to_image_part(image: Image.Image, *, name: str, max_pixels: int) -> ImagePart:
    """``image`` decoded, downscaled to ``max_pixels`` and re-encoded as PNG or JPEG.

    Raises:
        FileRefusedError: the image data is damaged.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)  # the first frame of an animation
            image.load()
            pixels = image.width * image.height
            downscaled = pixels > max_pixels
            if downscaled:
                scale = math.sqrt(max_pixels / pixels)
                size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            has_alpha = image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            )
            out = io.BytesIO()
            if has_alpha:
                image.convert("RGBA").save(out, "PNG", optimize=True)
                kind = "png"
            else:
                image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
                kind = "jpeg"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise FileRefusedError(f"{name} could not be read: the image data is damaged.") from e
    encoded = base64.b64encode(out.getvalue()).decode("ascii")
    return ImagePart(f"data:image/{kind};base64,{encoded}", image.width, image.height, downscaled)


def read_pdf(data: bytes, *, name: str, max_chars: int) -> str:
    """The text of a PDF, page by page until ``max_chars`` (+1, to tell it was cut).

    Raises:
        FileRefusedError: the PDF cannot be parsed or is password-protected.
    """
    try:
        with warnings.catch_warnings():
            # pypdf warns about recoverable damage; what it can read is still used.
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise FileRefusedError(f"{name} is password-protected, so I cannot read it.")
            texts: list[str] = []
            total = 0
            for page in reader.pages:
                text = page.extract_text() or ""
                texts.append(text)
                total += len(text) + 2
                if total > max_chars:
                    break
    except FileRefusedError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        # pypdf raises a range of errors on damaged files (it parses untrusted input).
        logger.info("a PDF could not be read: %s", type(e).__name__)
        raise FileRefusedError(f"{name} could not be read: the PDF is damaged.") from e
    return "\n\n".join(t.strip() for t in texts if t.strip())[: max_chars + 1]


def decode_text(data: bytes) -> str | None:
    """``data`` as text (UTF-8, or UTF-16 with a byte-order mark); ``None`` if binary."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in data[:8192]:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n")
