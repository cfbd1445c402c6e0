"""Shared pieces of payload parsing and building: a cursor that reports errors precisely,
NUL-terminated strings, and the fixed-size integers of the protocol."""

from __future__ import annotations

import re
import struct
from typing import Final

from pydantic import ValidationError

from milterapp.errors import RemoteProtocolError
from milterapp.events import decode_text, encode_text

__all__ = [
    "IPV6_PREFIX",
    "OPTNEG",
    "REPLY_CODE",
    "U16",
    "U32",
    "XCODE_PREFIX",
    "Reader",
    "cstrings",
    "first_error",
    "single_string",
]

U32: Final = struct.Struct("!I")
U16: Final = struct.Struct("!H")
OPTNEG: Final = struct.Struct("!III")
IPV6_PREFIX: Final = "ipv6:"
REPLY_CODE: Final = re.compile(r"[45][0-9][0-9]")
XCODE_PREFIX: Final = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")


class Reader:
    """Cursor over one payload that reports errors with the command letter and offset."""

    __slots__ = ("command", "payload", "pos")

    def __init__(self, command: str, payload: bytes) -> None:
        self.command = command
        self.payload = payload
        self.pos = 0

    def fail(self, message: str, offset: int | None = None) -> RemoteProtocolError:
        return RemoteProtocolError(
            message, command=self.command, offset=self.pos if offset is None else offset
        )

    def string(self, field: str) -> bytes:
        end = self.payload.find(b"\x00", self.pos)
        if end < 0:
            raise self.fail(f"{field} is not NUL-terminated")
        value = self.payload[self.pos : end]
        self.pos = end + 1
        return value

    def uint(self, unpacker: struct.Struct, field: str) -> int:
        if len(self.payload) - self.pos < unpacker.size:
            raise self.fail(f"{field} truncated: needs {unpacker.size} bytes")
        (value,) = unpacker.unpack_from(self.payload, self.pos)
        self.pos += unpacker.size
        return int(value)

    def strings(self, field: str) -> list[bytes]:
        """Read NUL-terminated strings up to the end of the payload."""
        rest = self.payload[self.pos :] if self.pos else self.payload
        if not rest:
            return []
        values = rest.split(b"\x00")
        if values[-1]:
            raise self.fail(f"{field} is not NUL-terminated", len(self.payload) - len(values[-1]))
        values.pop()
        self.pos = len(self.payload)
        return values

    def end(self) -> None:
        if self.pos != len(self.payload):
            raise self.fail(f"{len(self.payload) - self.pos} unexpected bytes after the last field")


def first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {error['msg']}" if field else str(error["msg"])


def cstrings(*values: str | bytes) -> bytes:
    return b"".join((v if isinstance(v, bytes) else encode_text(v)) + b"\x00" for v in values)


def single_string(r: Reader, field: str) -> str:
    value = decode_text(r.string(field))
    r.end()
    return value
