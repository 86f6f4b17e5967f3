"""The clip of a request: its body, raw or ``multipart/form-data``, read under a size cap.

The cap is checked while the body streams in: a declared ``Content-Length``
over it is refused before anything is read, and a body that runs past it is
refused at the chunk that passes it, so no request makes the service hold
more than the cap. A multipart body is parsed as it arrives
(python-multipart's streaming parser, the one Starlette uses); only the part
named ``file`` is kept. The upload's file name is used for its suffix alone
(which decoder reads it) and to name it in answers; no path is ever taken
from a request.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from mert_indexer.service.errors import ApiError

FIELD = "file"
DEFAULT_NAME = "upload"
# A raw body's type names its format when no file name does.
SUFFIX_OF_TYPE = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/vorbis": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/mp4": ".m4a",
    "audio/aac": ".m4a",
    "audio/x-m4a": ".m4a",
}
_UNSAFE = re.compile(r"[^\w.\- ]+")


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # a bare file name: the suffix picks the decoder


def clean_name(name: str | None, content_type: str = "") -> str:
    """A bare, printable file name for an upload (directories and odd characters dropped)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip(" .")[:100]
    if not base:
        kind = content_type.split(";", 1)[0].strip().lower()
        base = DEFAULT_NAME + SUFFIX_OF_TYPE.get(kind, "")
    return base


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"the upload is larger than {limit:,} bytes, the most a request may carry; "
        "send a shorter excerpt",
    )


async def read_upload(
    chunks: AsyncIterator[bytes],
    headers: dict[str, str],
    limit: int,
    name: str | None = None,
) -> Upload:
    """The clip of a request with ``headers`` whose body arrives as ``chunks``.

    Raises :class:`ApiError`: 413 past ``limit`` bytes of body, 400 for an empty
    clip or a multipart body without a ``file`` part or that does not parse.
    """
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    content_type = headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        upload = await _multipart(chunks, content_type, limit)
    else:
        upload = Upload(await _raw(chunks, limit), clean_name(name, content_type))
    if not upload.data:
        raise ApiError(
            400,
            "empty_body",
            "the request carries no audio: send the clip as the body, or as the "
            f"multipart form field {FIELD!r}",
        )
    return upload


async def _raw(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise too_large(limit)
    return bytes(buf)


class _Parts:
    """Callbacks of the streaming multipart parser that keep the ``file`` part."""

    def __init__(self) -> None:
        self.data = io.BytesIO()
        self.name: str | None = None
        self.found = False
        self._keep = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, bytes] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._keep = False

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        field = params.get(b"name", b"").decode("utf-8", "replace")
        if field == FIELD and not self.found:
            self.found = self._keep = True
            filename = params.get(b"filename")
            self.name = filename.decode("utf-8", "replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self.data.write(data[start:end])


async def _multipart(chunks: AsyncIterator[bytes], content_type: str, limit: int) -> Upload:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed_multipart", "multipart/form-data without a boundary")
    parts = _Parts()
    parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(
            400, "malformed_multipart", f"the multipart body does not parse: {exc}"
        ) from None
    if not parts.found:
        raise ApiError(
            400, "missing_file", f"the multipart form has no field {FIELD!r} with the clip"
        )
    return Upload(parts.data.getvalue(), clean_name(parts.name))
