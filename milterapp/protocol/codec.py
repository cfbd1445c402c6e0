"""Payloads to models and models to packets, in both directions.

The milter side decodes commands and encodes responses; the MTA side (the testing kit, the
load generator) encodes commands and decodes responses. Every decoding error is a
:class:`RemoteProtocolError` that names the command letter, the field and the byte offset;
no malformed payload can raise anything else (``IndexError``, ``UnicodeDecodeError``,
``struct.error`` and pydantic's ``ValidationError`` are all translated).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable
from typing import Final

from pydantic import ValidationError

from milterapp.errors import RemoteProtocolError
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    EsmtpArgs,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
    decode_text,
    encode_text,
    strip_brackets,
)
from milterapp.protocol.constants import (
    DEFAULT_MAX_DATA_SIZE,
    ActionFlag,
    Command,
    MacroStage,
    ProtocolFlag,
    ResponseCode,
)
from milterapp.protocol.framing import encode_frame
from milterapp.replies import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    NegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)

__all__ = [
    "decode_command",
    "decode_response",
    "encode_command",
    "encode_response",
    "split_body",
]

_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
_OPTNEG: Final = struct.Struct("!III")
_IPV6_PREFIX: Final = "ipv6:"
_REPLY_CODE: Final = re.compile(r"[45][0-9][0-9]")
_XCODE_PREFIX: Final = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")


class _Reader:
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


# --- MTA -> milter: decoding -------------------------------------------------------------


def _decode_optneg(r: _Reader) -> Event:
    # libmilter reads the first 12 bytes and ignores any more; so do we.
    if len(r.payload) < _OPTNEG.size:
        raise r.fail(f"negotiation payload is {len(r.payload)} bytes; needs 12")
    version, actions, protocol = _OPTNEG.unpack_from(r.payload)
    return Negotiate(version=version, actions=ActionFlag(actions), protocol=ProtocolFlag(protocol))


def _decode_macro(r: _Reader) -> Event:
    if not r.payload:
        raise r.fail("macro packet lacks its stage letter")
    stage = chr(r.payload[0])
    r.pos = 1
    strings = r.strings("macro name or value")
    if len(strings) % 2:
        raise r.fail(f"macro {decode_text(strings[-1])!r} has no value")
    texts = [s.decode("utf-8", "surrogateescape") for s in strings]
    return Macros(stage=stage, values=dict(zip(texts[::2], texts[1::2], strict=True)))


def _decode_connect(r: _Reader) -> Event:
    hostname = decode_text(r.string("hostname"))
    if r.pos >= len(r.payload):
        raise r.fail("family byte missing")
    letter = chr(r.payload[r.pos])
    try:
        family = AddressFamily(letter)
    except ValueError:
        raise r.fail(f"unknown address family {letter!r}; expected U, L, 4 or 6") from None
    r.pos += 1
    if family is AddressFamily.UNKNOWN:
        r.end()
        return Connect(hostname=hostname, family=family)
    port = r.uint(_U16, "port")
    at = r.pos
    text = decode_text(r.string("address"))
    r.end()
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    try:
        if family is AddressFamily.INET:
            address = ipaddress.IPv4Address(text)
        elif family is AddressFamily.INET6:
            # Sendmail writes "IPv6:2001:db8::1"; Postfix the bare address (§3).
            if text[: len(_IPV6_PREFIX)].lower() == _IPV6_PREFIX:
                text = text[len(_IPV6_PREFIX) :]
            address = ipaddress.IPv6Address(text)
        else:
            address = text
    except ValueError:
        raise r.fail(f"bad {family.name} address {text!r}", at) from None
    return Connect(hostname=hostname, family=family, port=port, address=address)


def _single_string(r: _Reader, field: str) -> str:
    value = decode_text(r.string(field))
    r.end()
    return value


def _decode_envelope(r: _Reader, model: type[EnvFrom] | type[EnvRcpt]) -> Event:
    argv = [decode_text(s) for s in r.strings("address or ESMTP argument")]
    if not argv:
        raise r.fail("address missing")
    return model(address=strip_brackets(argv[0]), raw=argv[0], args=EsmtpArgs.parse(argv[1:]))


def _decode_header(r: _Reader, leading_space: bool) -> Event:
    parts = r.payload.split(b"\x00")
    if len(parts) != 3 or parts[2] or not parts[0]:
        # Not the common shape: parse field by field to say exactly what is wrong.
        if not r.string("header name"):
            raise r.fail("empty header name", 0)
        r.string("header value")
        r.end()
    return Header(
        name=parts[0].decode("utf-8", "surrogateescape"),
        value=parts[1].decode("utf-8", "surrogateescape"),
        leading_space=leading_space,
    )


def _empty(model: type[Event]) -> Callable[[_Reader], Event]:
    def decode(r: _Reader) -> Event:
        r.end()
        return model()

    return decode


_COMMAND_DECODERS: Final[dict[int, Callable[[_Reader], Event]]] = {
    ord(Command.OPTNEG.value): _decode_optneg,
    ord(Command.MACRO.value): _decode_macro,
    ord(Command.CONNECT.value): _decode_connect,
    ord(Command.HELO.value): lambda r: Helo(name=_single_string(r, "HELO name")),
    ord(Command.MAIL.value): lambda r: _decode_envelope(r, EnvFrom),
    ord(Command.RCPT.value): lambda r: _decode_envelope(r, EnvRcpt),
    ord(Command.DATA.value): _empty(Data),
    ord(Command.EOH.value): _empty(EndOfHeaders),
    ord(Command.BODY.value): lambda r: Body(chunk=r.payload),
    ord(Command.BODYEOB.value): lambda r: EndOfMessage(chunk=r.payload),
    ord(Command.UNKNOWN.value): lambda r: Unknown(line=_single_string(r, "command line")),
    ord(Command.ABORT.value): _empty(Abort),
    ord(Command.QUIT.value): _empty(Quit),
    ord(Command.QUIT_NC.value): _empty(QuitNoClose),
}
_HEADER_BYTE: Final = ord(Command.HEADER.value)


def decode_command(command: int, payload: bytes, *, leading_space: bool = False) -> Event:
    """Decode one MTA command packet into its event model.

    Args:
        command: the command byte (``ord("M")``).
        payload: the bytes after the command byte.
        leading_space: HDR_LEADSPC was negotiated (recorded on :class:`Header` events).

    Raises:
        RemoteProtocolError: unknown command letter or malformed payload.
    """
    r = _Reader(chr(command), payload)
    try:
        if command == _HEADER_BYTE:
            return _decode_header(r, leading_space)
        decoder = _COMMAND_DECODERS.get(command)
        if decoder is None:
            raise r.fail(f"unknown command byte 0x{command:02x}", 0)
        return decoder(r)
    except ValidationError as exc:
        raise r.fail(f"invalid content: {_first_error(exc)}", 0) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {error['msg']}" if field else str(error["msg"])


# --- MTA -> milter: encoding (the MTA side) ----------------------------------------------


def _cstrings(*values: str | bytes) -> bytes:
    return b"".join((v if isinstance(v, bytes) else encode_text(v)) + b"\x00" for v in values)


def _payload_connect(event: Connect) -> bytes:
    head = _cstrings(event.hostname) + event.family.value.encode()
    if event.family is AddressFamily.UNKNOWN:
        return head
    return head + _U16.pack(event.port or 0) + _cstrings(str(event.address))


def _payload_macros(event: Macros) -> bytes:
    pairs = [part for item in event.values.items() for part in item]
    return event.stage.encode("latin-1") + _cstrings(*pairs)


def _command_payload(event: Event) -> bytes:
    match event:
        case Negotiate():
            return _OPTNEG.pack(event.version, event.actions, event.protocol)
        case Macros():
            return _payload_macros(event)
        case Connect():
            return _payload_connect(event)
        case Helo():
            return _cstrings(event.name)
        case EnvFrom() | EnvRcpt():
            return _cstrings(event.raw, *event.args.as_strings())
        case Header():
            return _cstrings(event.name, event.value)
        case Body() | EndOfMessage():
            return event.chunk
        case Unknown():
            return _cstrings(event.line)
        case Data() | EndOfHeaders() | Abort() | Quit() | QuitNoClose():
            return b""
    raise TypeError(f"{type(event).__name__} has no packet form")


def encode_command(event: Event) -> bytes:
    """Return the whole packet the MTA sends for ``event``.

    Raises:
        TypeError: the event has no packet form (:class:`~milterapp.events.ConnectionClosed`).
    """
    return encode_frame(event.command, _command_payload(event))


# --- milter -> MTA: encoding -------------------------------------------------------------


def _reply_text(reply: Reject | TempFail) -> bytes:
    lines = [line.replace("%", "%%") for line in reply.smtp_lines()]
    return _cstrings("\r\n".join(lines))


def split_body(body: bytes, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> list[bytes]:
    """Split a replacement body into chunks of at most ``max_data_size`` bytes.

    An empty body is one empty chunk, so that the MTA still replaces the body.
    """
    if not body:
        return [b""]
    view = memoryview(body)
    return [bytes(view[i : i + max_data_size]) for i in range(0, len(body), max_data_size)]


def _negotiation_payload(reply: NegotiationReply) -> bytes:
    lists = (
        _U32.pack(stage) + _cstrings(" ".join(reply.macros[stage]))
        for stage in sorted(reply.macros)
    )
    return _OPTNEG.pack(reply.version, reply.actions, reply.protocol) + b"".join(lists)


_EMPTY_RESPONSES: Final[dict[type[Reply], bytes]] = {
    Continue: ResponseCode.CONTINUE.value,
    Accept: ResponseCode.ACCEPT.value,
    Discard: ResponseCode.DISCARD.value,
    Skip: ResponseCode.SKIP.value,
    Progress: ResponseCode.PROGRESS.value,
    Shutdown: ResponseCode.SHUTDOWN.value,
}


def _response_packet(reply: Reply) -> tuple[bytes, bytes]:
    match reply:
        case Reject() | TempFail() if reply.has_reply_text:
            return ResponseCode.REPLYCODE.value, _reply_text(reply)
        case Reject():
            return ResponseCode.REJECT.value, b""
        case TempFail():
            return ResponseCode.TEMPFAIL.value, b""
        case AddHeader():
            return ResponseCode.ADDHEADER.value, _cstrings(reply.name, reply.value)
        case InsertHeader():
            return ResponseCode.INSHEADER.value, _U32.pack(reply.index) + _cstrings(
                reply.name, reply.value
            )
        case ChangeHeader():
            return ResponseCode.CHGHEADER.value, _U32.pack(reply.index) + _cstrings(
                reply.name, reply.value
            )
        case AddRecipient() if reply.args is None:
            return ResponseCode.ADDRCPT.value, _cstrings(reply.address)
        case AddRecipient():
            return ResponseCode.ADDRCPT_PAR.value, _cstrings(reply.address, reply.args or "")
        case DeleteRecipient():
            return ResponseCode.DELRCPT.value, _cstrings(reply.address)
        case ChangeSender():
            args = () if reply.args is None else (reply.args,)
            return ResponseCode.CHGFROM.value, _cstrings(reply.address, *args)
        case Quarantine():
            return ResponseCode.QUARANTINE.value, _cstrings(reply.reason)
        case NegotiationReply():
            return ResponseCode.OPTNEG.value, _negotiation_payload(reply)
    raise TypeError(f"{type(reply).__name__} is not a milter response")


def encode_response(reply: Reply, *, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> bytes:
    """Return the packet(s) the milter sends for ``reply``.

    :class:`ReplaceBody` becomes as many ``b`` packets as ``max_data_size`` requires.
    """
    code = _EMPTY_RESPONSES.get(type(reply))
    if code is not None:
        return encode_frame(code)
    if isinstance(reply, ReplaceBody):
        letter = ResponseCode.REPLBODY.value
        return b"".join(encode_frame(letter, c) for c in split_body(reply.chunk, max_data_size))
    return encode_frame(*_response_packet(reply))


# --- milter -> MTA: decoding (the MTA side) ----------------------------------------------


def _strip_prefix(line: str, prefix: str) -> str:
    """Remove ``prefix`` when it is followed by a separator (or ends the line)."""
    if line.startswith(prefix) and line[len(prefix) : len(prefix) + 1] in ("", " ", "-"):
        return line[len(prefix) + 1 :]
    return line


def _decode_reply_code(r: _Reader) -> Reply:
    text = decode_text(r.string("reply text"))
    r.end()
    lines = text.split("\r\n")
    code = lines[0][:3]
    if not _REPLY_CODE.fullmatch(code) or lines[0][3:4] not in ("", " ", "-"):
        raise r.fail(f"reply must start with a 4xx or 5xx code, not {lines[0][:4]!r}", 0)
    rests = [_strip_prefix(line, code) for line in lines]
    found = _XCODE_PREFIX.match(rests[0])
    xcode = found.group(1) if found else None
    # An enhanced code belongs to the reply only when every line carries it (as ours do).
    if xcode is not None and all(_XCODE_PREFIX.match(rest) for rest in rests):
        rests = [_strip_prefix(rest, xcode) for rest in rests]
    else:
        xcode = None
    model = TempFail if code[0] == "4" else Reject
    return model(code=int(code), xcode=xcode, text="\n".join(rests).replace("%%", "%"))


def _decode_optneg_reply(r: _Reader) -> Reply:
    if len(r.payload) < _OPTNEG.size:
        raise r.fail(f"negotiation reply is {len(r.payload)} bytes; needs at least 12")
    version, actions, protocol = _OPTNEG.unpack_from(r.payload)
    r.pos = _OPTNEG.size
    macros: dict[MacroStage, tuple[str, ...]] = {}
    while r.pos < len(r.payload):
        at = r.pos
        number = r.uint(_U32, "macro stage")
        try:
            stage = MacroStage(number)
        except ValueError:
            raise r.fail(f"unknown macro stage {number}", at) from None
        names = decode_text(r.string("macro list")).replace(",", " ").split()
        macros[stage] = tuple(names)
    return NegotiationReply(
        version=version,
        actions=ActionFlag(actions),
        protocol=ProtocolFlag(protocol),
        macros=macros,
    )


def _decode_header_edit(r: _Reader, model: type[InsertHeader] | type[ChangeHeader]) -> Reply:
    index = r.uint(_U32, "header index")
    name, value = (decode_text(r.string(f)) for f in ("header name", "header value"))
    r.end()
    return model(index=index, name=name, value=value)


def _decode_address_args(r: _Reader, model: type[AddRecipient] | type[ChangeSender]) -> Reply:
    values = [decode_text(s) for s in r.strings("address or arguments")]
    if not values or len(values) > 2:
        raise r.fail(f"expected an address and optional arguments, got {len(values)} strings", 0)
    return model(address=values[0], args=values[1] if len(values) == 2 else None)


def _decode_add_header(r: _Reader) -> Reply:
    name, value = (decode_text(r.string(f)) for f in ("header name", "header value"))
    r.end()
    return AddHeader(name=name, value=value)


def _no_payload(
    model: type[Continue | Accept | Reject | TempFail | Discard | Skip | Progress | Shutdown],
) -> Callable[[_Reader], Reply]:
    def decode(r: _Reader) -> Reply:
        if r.payload:
            raise r.fail(f"response carries {len(r.payload)} unexpected bytes", 0)
        return model()

    return decode


_RESPONSE_DECODERS: Final[dict[int, Callable[[_Reader], Reply]]] = {
    ord(ResponseCode.OPTNEG.value): _decode_optneg_reply,
    ord(ResponseCode.CONTINUE.value): _no_payload(Continue),
    ord(ResponseCode.ACCEPT.value): _no_payload(Accept),
    ord(ResponseCode.REJECT.value): _no_payload(Reject),
    ord(ResponseCode.TEMPFAIL.value): _no_payload(TempFail),
    ord(ResponseCode.DISCARD.value): _no_payload(Discard),
    ord(ResponseCode.SKIP.value): _no_payload(Skip),
    ord(ResponseCode.PROGRESS.value): _no_payload(Progress),
    ord(ResponseCode.SHUTDOWN.value): _no_payload(Shutdown),
    ord(ResponseCode.REPLYCODE.value): _decode_reply_code,
    ord(ResponseCode.ADDHEADER.value): _decode_add_header,
    ord(ResponseCode.INSHEADER.value): lambda r: _decode_header_edit(r, InsertHeader),
    ord(ResponseCode.CHGHEADER.value): lambda r: _decode_header_edit(r, ChangeHeader),
    ord(ResponseCode.ADDRCPT.value): lambda r: AddRecipient(address=_single_string(r, "recipient")),
    ord(ResponseCode.ADDRCPT_PAR.value): lambda r: _decode_address_args(r, AddRecipient),
    ord(ResponseCode.DELRCPT.value): lambda r: DeleteRecipient(
        address=_single_string(r, "recipient")
    ),
    ord(ResponseCode.CHGFROM.value): lambda r: _decode_address_args(r, ChangeSender),
    ord(ResponseCode.REPLBODY.value): lambda r: ReplaceBody(chunk=r.payload),
    ord(ResponseCode.QUARANTINE.value): lambda r: Quarantine(
        reason=_single_string(r, "quarantine reason")
    ),
}


def decode_response(command: int, payload: bytes) -> Reply:
    """Decode one milter response packet into its model (the MTA side).

    Raises:
        RemoteProtocolError: unknown response letter or malformed payload.
    """
    r = _Reader(chr(command), payload)
    decoder = _RESPONSE_DECODERS.get(command)
    if decoder is None:
        raise r.fail(f"unknown response byte 0x{command:02x}", 0)
    try:
        return decoder(r)
    except ValidationError as exc:
        raise r.fail(f"invalid content: {_first_error(exc)}", 0) from None
