"""Images a client sends: ``data:`` URLs (and, only when the server allows it, http(s) URLs) checked
against byte and pixel limits before anything is decoded, then kept as files named by their
content hash in the server's private upload folder, where the engine reads them like any upload."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


@dataclass
class ImageLimits:
    max_bytes: int = 10 * 2**20          # one image's encoded size
    max_pixels: int = 4096 * 4096        # checked from the header, before decoding
    max_images: int = 8                  # per request, the whole history included
    allow_remote: bool = False           # http(s) URLs are fetched only when the server allows it
    remote_timeout: float = 10.0         # seconds for one download


class ImageInbox:
    """Turns image URLs into checked files under ``folder``."""

    def __init__(self, folder: str | Path, limits: ImageLimits | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits or ImageLimits()

    def save(self, url: str, param: str) -> str:
        """The path of the checked image behind ``url``; an APIError (400) says what is wrong."""
        if not isinstance(url, str) or not url:
            raise bad_request("image_url.url must be a non-empty string", param)
        if url.startswith("data:"):
            data = self._decode_data_url(url, param)
        elif url.startswith(("http://", "https://")):
            if not self.limits.allow_remote:
                raise bad_request("image URLs over http(s) are not accepted by this server (start it with "
                                  "--allow-remote-images); send the image as a data: URL", param,
                                  "remote_images_disabled")
            data = self._download(url, param)
        else:
            raise bad_request("unsupported image URL: send a data:image/...;base64 URL (local paths and other "
                              "schemes are refused)", param, "invalid_image_url")
        return self._store(data, param)

    def _decode_data_url(self, url: str, param: str) -> bytes:
        header, comma, encoded = url[5:].partition(",")
        mime, *params = header.split(";")
        if not comma or len(header) > 100 or not mime.startswith("image/") or "base64" not in params:
            raise bad_request("a data URL must look like data:image/png;base64,...", param, "invalid_image_url")
        if len(encoded) * 3 // 4 > self.limits.max_bytes + 3:
            raise self._too_large(f"more than {self.limits.max_bytes} bytes", param)
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data URL is not valid base64", param, "invalid_image_url") from None

    def _download(self, url: str, param: str) -> bytes:
        import httpx

        limit = self.limits.max_bytes
        try:
            with httpx.stream("GET", url, timeout=self.limits.remote_timeout, follow_redirects=True,
                              headers={"Accept": "image/*"}) as r:
                if r.status_code != 200:
                    raise bad_request(f"could not download the image: HTTP {r.status_code}", param,
                                      "image_download_failed")
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise self._too_large(f"more than {limit} bytes", param)
                return bytes(data)
        except httpx.HTTPError as e:
            raise bad_request(f"could not download the image: {type(e).__name__}", param,
                              "image_download_failed") from None

    def _store(self, data: bytes, param: str) -> str:
        if len(data) > self.limits.max_bytes:
            raise self._too_large(f"{len(data)} bytes, more than {self.limits.max_bytes}", param)
        digest = hashlib.sha256(data).hexdigest()
        for ext in FORMATS.values():  # these very bytes were checked and kept before
            known = self.folder / f"{digest}.{ext}"
            if known.exists():
                return str(known)
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
                if fmt not in FORMATS:
                    raise bad_request(f"unsupported image format {fmt} (send PNG, JPEG, WebP, GIF or BMP)", param,
                                      "invalid_image")
                if w * h > self.limits.max_pixels:  # a decompression bomb is refused before decoding
                    raise self._too_large(f"{w}x{h} pixels, more than {self.limits.max_pixels}", param)
                im.load()
        except Image.DecompressionBombError:  # Pillow's own header check, past twice its pixel limit
            raise self._too_large("a decompression bomb (its header claims too many pixels)", param) from None
        except UnidentifiedImageError:
            raise bad_request("the image could not be read (not an image, or an unsupported format)", param,
                              "invalid_image") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise bad_request(f"corrupt or truncated image: {e}", param, "invalid_image") from None
        path = self.folder / f"{digest}.{FORMATS[fmt]}"
        if not path.exists():
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)

    @staticmethod
    def _too_large(what: str, param: str) -> APIError:
        return bad_request(f"image too large: {what}", param, "image_too_large")
