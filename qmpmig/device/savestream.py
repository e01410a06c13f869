"""The reference device's migration data: what flows through data_fd (v2)
or the migration region's data window (v1).

The uAPI leaves the stream opaque to userspace; this device makes it
self-checking so that a destination never loads what it should refuse
(seed 003: a corrupted migration may fail, but must not corrupt):

- a QHDR chunk first, naming the device model, stream version and the
  configuration the state belongs to; a destination of another model,
  version or configuration refuses it;
- then PAGE chunks (page index, 4 KiB of internal state) and one REGS chunk
  (registers and engine state, JSON);
- a DONE chunk last, carrying the number of chunks before it and the
  digest of the source's final internal state, which the destination
  recomputes after loading.

Every chunk is ``<4sIQI`` (tag, payload length, argument, CRC-32) followed
by the payload; the CRC-32 is the payload's, continued over tag, argument
and length (``<4sQI``), so that the payload's own CRC is there to reuse.  Bytes may be
cut anywhere between reads and writes (v2 keeps only the byte order).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from ..bytequeue import ByteQueue
from ..errors import StreamError

CHUNK = struct.Struct("<4sIQI")
VERSION = 2
MODEL = "qmpmig-reference-dma"
MAX_PAYLOAD = 1 << 20
TAGS = (b"QHDR", b"PAGE", b"REGS", b"DONE")
#: The longest JSON chunk (QHDR, REGS: a few KiB): parsed JSON takes up to
#: some 25 times its text, and the stream is the client's to write
#: (issue 14: no allocation sized by an unchecked field).
MAX_JSON = 64 << 10
JSON_TAGS = (b"QHDR", b"REGS")


@dataclass(frozen=True)
class Chunk:
    tag: bytes
    arg: int
    #: The payload as views of the pieces it arrived in (not joined).
    parts: tuple[memoryview, ...]
    #: CRC-32 of the payload alone.
    payload_crc: int

    @property
    def payload(self) -> bytes:
        return b"".join(self.parts)

    def __len__(self) -> int:
        return sum(map(len, self.parts))


def _crc(tag: bytes, arg: int, length: int, payload_crc: int) -> int:
    """The chunk's CRC-32: the payload's, continued over tag, arg, length."""
    return zlib.crc32(struct.pack("<4sQI", tag, arg, length), payload_crc)


def chunk_header(tag: bytes, arg: int, payload: bytes | memoryview, payload_crc: int | None = None) -> bytes:
    if payload_crc is None:
        payload_crc = zlib.crc32(payload)
    return CHUNK.pack(tag, len(payload), arg, _crc(tag, arg, len(payload), payload_crc))


def encode(tag: bytes, arg: int, payload: bytes) -> bytes:
    return chunk_header(tag, arg, payload) + payload


def header(config: dict) -> bytes:
    body = {"model": MODEL, "version": VERSION, "config": config}
    return encode(b"QHDR", 0, json.dumps(body, sort_keys=True).encode())


def read_json(chunk: Chunk, what: str) -> dict:
    """A JSON chunk's object; StreamError for anything else."""
    try:
        value = json.loads(bytes(chunk.payload))
    except (ValueError, RecursionError) as err:
        raise StreamError(f"unreadable {what}: {err}") from None
    if not isinstance(value, dict):
        raise StreamError(f"the {what} is not a JSON object")
    return value


class StreamReader:
    """Incremental decoder for one resume: feed bytes, get chunks; raises
    StreamError (and stays failed) on anything it must not load."""

    def __init__(self, config: dict):
        self.config = config
        self._buf = ByteQueue()
        self.chunks = 0
        self.done: Chunk | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        if self.error:
            raise StreamError(self.error)
        try:
            return self._feed(data)
        except StreamError as err:
            self.error = str(err)
            raise

    def _feed(self, data: bytes) -> list[Chunk]:
        if self.done and data:
            raise StreamError("data after the end of the stream")
        self._buf.append(data)
        out = []
        while len(self._buf) >= CHUNK.size:
            tag, length, arg, crc = CHUNK.unpack_from(self._buf.front(CHUNK.size))
            if tag not in TAGS:
                raise StreamError(f"chunk {self.chunks}: unknown tag {tag!r}")
            if length > (MAX_JSON if tag in JSON_TAGS else MAX_PAYLOAD):
                raise StreamError(f"chunk {self.chunks} ({tag.decode()}): length {length} too large")
            if len(self._buf) < CHUNK.size + length:
                break
            self._buf.skip(CHUNK.size)
            parts = tuple(self._buf.take_parts(length))
            payload_crc = 0
            for part in parts:
                payload_crc = zlib.crc32(part, payload_crc)
            if _crc(tag, arg, length, payload_crc) != crc:
                raise StreamError(f"chunk {self.chunks} ({tag.decode()}): checksum mismatch")
            chunk = Chunk(tag, arg, parts, payload_crc)
            self._check(chunk)
            self.chunks += 1
            out.append(chunk)
            if tag == b"DONE":
                self.done = chunk
                if self._buf:
                    raise StreamError("data after the end of the stream")
        return out

    def _check(self, chunk: Chunk) -> None:
        if self.chunks == 0:
            if chunk.tag != b"QHDR":
                raise StreamError("stream does not start with a qmpmig device header")
            head = read_json(chunk, "header")
            if head.get("model") != MODEL:
                raise StreamError(f"stream is for device model {head.get('model')!r}, this is {MODEL!r}")
            if head.get("version") != VERSION:
                raise StreamError(f"stream version {head.get('version')!r}, this device reads {VERSION}")
            if head.get("config") != self.config:
                raise StreamError(f"stream configuration {head.get('config')} differs from this device's {self.config}")
        elif chunk.tag == b"QHDR":
            raise StreamError(f"chunk {self.chunks}: a second header")
        elif chunk.tag == b"DONE" and chunk.arg != self.chunks:
            raise StreamError(f"stream ended after {self.chunks} chunks, the source sent {chunk.arg}")

    def finish(self) -> Chunk:
        """The DONE chunk; StreamError if the stream stopped short."""
        if self.error:
            raise StreamError(self.error)
        if self.done is None:
            self.error = f"truncated stream: {self.chunks} chunks and {len(self._buf)} bytes, no end marker"
            raise StreamError(self.error)
        return self.done
