"""Packet framing: ``uint32 length`` (big-endian, counts the command byte) + command + payload.

:class:`FrameDecoder` takes bytes in any split, one byte at a time included, and hands out
whole packets. It copies as little as it can:

* a packet that arrives whole inside one read is sliced straight out of it: that is its only
  copy when the read is a memoryview of the caller's buffer (see :meth:`FrameDecoder.release`);
* a large packet (a body chunk) that spans reads gets a buffer of its own size as soon as its
  length is known; :meth:`FrameDecoder.read_target` lends the rest of it to the caller, which
  reads straight into it, so the bytes that had not come yet are copied once, when the packet
  is handed out;
* a small packet that spans reads waits in pieces that are joined once it is whole.
"""

from __future__ import annotations

import struct
from typing import Final

from milterapp.constants import DEFAULT_MAX_DATA_SIZE
from milterapp.errors import FrameTooLargeError, RemoteProtocolError

__all__ = ["LENGTH", "FrameDecoder", "encode_frame"]

#: The length prefix of every packet.
LENGTH: Final = struct.Struct("!I")
_HEADER_SIZE: Final = LENGTH.size
_unpack_from = LENGTH.unpack_from
#: Packets at least this long that span reads are assembled in a buffer of their own.
ASSEMBLE_FROM: Final = 8 * 1024
#: ...once at least one eighth of them has come.
_MAX_AHEAD: Final = 8


def encode_frame(command: bytes, payload: bytes = b"") -> bytes:
    """Return one packet: length prefix, ``command`` (one byte) and ``payload``."""
    return LENGTH.pack(len(payload) + 1) + command + payload


class FrameDecoder:
    """Incremental packet decoder.

    Args:
        max_data_size: largest payload accepted (command byte excluded). A packet that
            announces more, or a length of zero, raises :class:`FrameTooLargeError` as soon
            as its four length bytes are in, before any of its payload is buffered.
    """

    __slots__ = (
        "_assembly",
        "_buf",
        "_filled",
        "_pending",
        "_pending_size",
        "_pos",
        "_view",
        "empty",
        "max_data_size",
        "partial",
    )

    def __init__(self, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> None:
        self.max_data_size = max_data_size
        self._buf: bytes | memoryview = b""
        self._view = False  # _buf is a memoryview lent by the caller until release()
        self._pos = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        # A large packet being assembled (command byte and payload), and how much is in.
        self._assembly: bytearray | None = None
        self._filled = 0
        #: When :meth:`next_frame` last returned None: whether a packet had begun.
        self.partial = False
        #: Nothing is buffered (``buffered == 0``), kept as an attribute for the per-packet
        #: path: True only when that is certain.
        self.empty = True

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; call :meth:`next_frame` until it returns None.

        A memoryview is read in place (payloads are copied out of it once): it must stay
        unchanged until :meth:`release`, which copies what is left of it.
        """
        if not data:
            return
        self.empty = False
        if self._assembly is not None:
            data = self._assemble(data)
            if not data:
                return
        if self._pos == len(self._buf) and not self._pending:
            # Nothing waiting (the usual case): packets are sliced straight out of this read.
            if isinstance(data, memoryview):
                self._buf = data
                self._view = True
            else:
                self._buf = data if isinstance(data, bytes) else bytes(data)
                self._view = False
            self._pos = 0
            return
        self._pending.append(bytes(data))
        self._pending_size += len(data)

    def release(self) -> None:
        """Stop reading a memoryview given to :meth:`feed`: copy what is left of it."""
        if self._view:
            self._buf = bytes(self._buf[self._pos :])
            self._pos = 0
            self._view = False

    def read_target(self) -> memoryview | None:
        """Where the rest of a large packet should be read to, if one is being assembled.

        Read at most ``len()`` bytes into it, then call :meth:`target_filled`.
        """
        assembly = self._assembly
        if assembly is None or self._filled == len(assembly):
            return None
        return memoryview(assembly)[self._filled :]

    def target_filled(self, size: int) -> None:
        """``size`` bytes were read into the view :meth:`read_target` gave."""
        assembly = self._assembly
        if assembly is None or not 0 <= size <= len(assembly) - self._filled:
            raise ValueError(f"target_filled({size}): more than the read target can hold")
        self._filled += size

    def _assemble(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Copy into the packet being assembled what it still lacks; return the rest."""
        assembly = self._assembly
        assert assembly is not None
        filled = self._filled
        take = min(len(assembly) - filled, len(data))
        assembly[filled : filled + take] = data[:take]
        self._filled = filled + take
        return data[take:]

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet handed out as packets."""
        size = len(self._buf) - self._pos + self._pending_size
        if self._assembly is not None:
            size += _HEADER_SIZE + self._filled
        return size

    def _contiguous(self, size: int) -> bool:
        """Make ``size`` bytes contiguous at the read position, if that many are in."""
        have = len(self._buf) - self._pos
        if have >= size:
            return True
        if have + self._pending_size < size:
            return False
        parts = self._pending
        if have:
            parts.insert(0, self._buf[self._pos :])
        # join() of a single bytes object returns it without copying.
        self._buf = b"".join(parts)
        self._view = False
        self._pos = 0
        self._pending = []
        self._pending_size = 0
        return True

    def next_frame(self) -> tuple[int, bytes] | None:
        """Return the next whole packet as ``(command byte, payload)``, or None if incomplete.

        Raises:
            FrameTooLargeError: the announced length is zero or above ``max_data_size + 1``.
        """
        if self._assembly is not None:
            return self._assembled()
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if pos == size and not self._pending:
            self.partial = False
            return None  # nothing buffered: the usual end of a read
        if size - pos >= _HEADER_SIZE:
            # Fast path: a whole, acceptable packet in the current buffer.
            (length,) = _unpack_from(buf, pos)
            end = pos + _HEADER_SIZE + length
            if end <= size and 0 < length <= self.max_data_size + 1:
                if end == size:
                    self._buf = b""
                    self._pos = 0
                    self.empty = not self._pending
                else:
                    self._pos = end
                if self._view:
                    if end == size:
                        self._view = False
                    return buf[pos + _HEADER_SIZE], bytes(buf[pos + _HEADER_SIZE + 1 : end])
                return buf[pos + _HEADER_SIZE], buf[pos + _HEADER_SIZE + 1 : end]  # type: ignore[return-value]
        return self._next_frame_joined()

    def take_frames(self) -> list[tuple[int, bytes]]:
        """Hand out every whole packet buffered, in order: one call per read instead of one
        per packet (a message's commands usually come in one read).

        Stops before a packet that is not whole, or that is refused; the next call hands that
        one out, or raises for it, as :meth:`next_frame` would. Empty when no packet is whole.
        """
        buf = self._buf
        if self._assembly is not None:
            pass
        elif isinstance(buf, bytes):
            # Typed bytes here (not the view's union): compiled, indexing and slicing it are
            # plain C. Slices of bytes are copies.
            pos = self._pos
            size = len(buf)
            limit = self.max_data_size + 1
            taken: list[tuple[int, bytes]] = []
            while size - pos >= _HEADER_SIZE:
                length: int = _unpack_from(buf, pos)[0]
                end = pos + _HEADER_SIZE + length
                if end > size or not 0 < length <= limit:
                    break
                taken.append((buf[pos + _HEADER_SIZE], buf[pos + _HEADER_SIZE + 1 : end]))
                pos = end
            if taken:
                if pos == size:
                    self._buf = b""
                    self._pos = 0
                    self.empty = not self._pending
                else:
                    self._pos = pos
                return taken
        elif taken := self._take_from_view(buf):
            return taken
        frame = self.next_frame()
        return [] if frame is None else [frame]

    def _take_from_view(self, buf: memoryview) -> list[tuple[int, bytes]]:
        """:meth:`take_frames` from a lent view: each payload is copied out of it."""
        pos = self._pos
        size = len(buf)
        limit = self.max_data_size + 1
        taken: list[tuple[int, bytes]] = []
        while size - pos >= _HEADER_SIZE:
            length: int = _unpack_from(buf, pos)[0]
            end = pos + _HEADER_SIZE + length
            if end > size or not 0 < length <= limit:
                break
            taken.append((buf[pos + _HEADER_SIZE], bytes(buf[pos + _HEADER_SIZE + 1 : end])))
            pos = end
        if pos == size:
            self._buf = b""
            self._pos = 0
            self._view = False
            self.empty = not self._pending
        else:
            self._pos = pos
        return taken

    def _next_frame_joined(self) -> tuple[int, bytes] | None:
        """:meth:`next_frame` for a packet that spans reads, or one that is refused."""
        self.partial = True  # (until a whole packet is handed out)
        if not self._contiguous(_HEADER_SIZE):
            return None
        (length,) = LENGTH.unpack_from(self._buf, self._pos)
        if length == 0:
            raise FrameTooLargeError("packet length 0: a packet holds at least its command byte")
        if length - 1 > self.max_data_size:
            raise FrameTooLargeError(
                f"packet payload of {length - 1} bytes exceeds the maximum of "
                f"{self.max_data_size} bytes"
            )
        if not self._contiguous(_HEADER_SIZE + length):
            # Assemble only what the peer has mostly begun to send: the buffer is allocated at
            # the packet's full size, and a peer must not make us hold much more than it sent.
            present = self.buffered - _HEADER_SIZE
            if present >= ASSEMBLE_FROM and present * _MAX_AHEAD >= length:
                self._start_assembly(length)
            return None
        start = self._pos + _HEADER_SIZE
        end = start + length
        buf = self._buf
        command = buf[start]
        payload = bytes(buf[start + 1 : end])  # a copy only if buf is a memoryview
        if end == len(buf):
            self._buf = b""
            self._view = False
            self._pos = 0
            self.empty = not self._pending
        else:
            self._pos = end
        return command, payload

    def _start_assembly(self, length: int) -> None:
        """Move the start of an incomplete large packet into a buffer of its own size."""
        self._assembly = bytearray(length)
        self._filled = 0
        head = self._buf[self._pos + _HEADER_SIZE :]
        parts = self._pending
        self._buf, self._pos, self._view = b"", 0, False
        self._pending, self._pending_size = [], 0
        for part in (head, *parts):  # less than the whole packet: all of it goes in
            left = self._assemble(part)
            assert not left

    def _assembled(self) -> tuple[int, bytes] | None:
        assembly = self._assembly
        assert assembly is not None
        if self._filled < len(assembly):
            self.partial = True
            return None
        self._assembly = None
        self._filled = 0
        self.empty = self._pos == len(self._buf) and not self._pending
        with memoryview(assembly) as view:
            return assembly[0], bytes(view[1:])

    def check_eof(self) -> None:
        """Raise if the peer closed the stream in the middle of a packet."""
        if self.buffered:
            raise RemoteProtocolError(
                f"connection closed in the middle of a packet ({self.buffered} bytes unread)"
            )
