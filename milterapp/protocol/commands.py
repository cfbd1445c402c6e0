"""MTA commands: payloads to event models (the milter side) and back (the MTA side).

Every decoding error is a :class:`RemoteProtocolError` naming the command letter, the field and
the byte offset; nothing else escapes (``IndexError``, ``UnicodeDecodeError``, ``struct.error``
and pydantic's ``ValidationError`` are translated).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Final

from pydantic import ValidationError

from milterapp.constants import (
    ActionFlag,
    Command,
    ProtocolFlag,
)
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
    strip_brackets,
)
from milterapp.protocol.framing import encode_frame
from milterapp.protocol.payload import (
    IPV6_PREFIX,
    OPTNEG,
    U16,
    Reader,
    cstrings,
    first_error,
    single_string,
)

__all__ = ["decode_command", "decode_macros", "encode_command"]


# --- MTA -> milter: decoding -------------------------------------------------------------


def _decode_optneg(r: Reader) -> Event:
    # libmilter reads the first 12 bytes and ignores any more; so do we.
    if len(r.payload) < OPTNEG.size:
        raise r.fail(f"negotiation payload is {len(r.payload)} bytes; needs 12")
    # An MTA offers the same on every connection, and events are frozen: one model per offer.
    key = r.payload[: OPTNEG.size]
    offer = _OFFERS.get(key)
    if offer is None:
        version, actions, protocol = OPTNEG.unpack_from(key)
        offer = Negotiate(
            version=version, actions=ActionFlag(actions), protocol=ProtocolFlag(protocol)
        )
        if len(_OFFERS) >= _OFFERS_KEPT:
            _OFFERS.clear()
        _OFFERS[key] = offer
    return offer


def decode_macros(payload: bytes) -> tuple[str, dict[str, str]]:
    """Decode a ``D`` payload into its stage letter and its values, without a model.

    Raises:
        RemoteProtocolError: no stage letter (or a zero byte), or a name without a value.
    """
    if len(payload) > 1 and payload[0] and payload[-1] == 0:
        # The usual shape, decoded in one go (NUL is one byte in UTF-8, so splitting the
        # decoded text equals decoding each string).
        texts = payload[1:-1].decode("utf-8", "surrogateescape").split("\0")
        if not len(texts) % 2:
            return chr(payload[0]), dict(zip(texts[::2], texts[1::2], strict=True))
    r = Reader("D", payload)
    if not payload:
        raise r.fail("macro packet lacks its stage letter")
    if not payload[0]:
        raise r.fail("invalid content: the stage letter is a zero byte", 0)
    r.pos = 1
    strings = r.strings("macro name or value")
    if len(strings) % 2:
        raise r.fail(f"macro {decode_text(strings[-1])!r} has no value")
    texts = [s.decode("utf-8", "surrogateescape") for s in strings]
    return chr(payload[0]), dict(zip(texts[::2], texts[1::2], strict=True))


def _decode_macro(r: Reader) -> Event:
    stage, values = decode_macros(r.payload)
    return Macros(stage=stage, values=values)


def _decode_connect(r: Reader) -> Event:
    hostname = decode_text(r.string("hostname"))
    if r.pos >= len(r.payload):
        raise r.fail("family byte missing")
    letter = chr(r.payload[r.pos])
    family = _FAMILIES.get(letter)
    if family is None:
        raise r.fail(f"unknown address family {letter!r}; expected U, L, 4 or 6")
    r.pos += 1
    if family is AddressFamily.UNKNOWN:
        r.end()
        return Connect(hostname=hostname, family=family)
    port = r.uint(U16, "port")
    at = r.pos
    text = decode_text(r.string("address"))
    r.end()
    # Sendmail writes "IPv6:2001:db8::1"; Postfix the bare address (§3).
    if family is AddressFamily.INET6 and text[: len(IPV6_PREFIX)].lower() == IPV6_PREFIX:
        text = text[len(IPV6_PREFIX) :]
    address = _address(family, text)
    if address is None:
        raise r.fail(f"bad {family.name} address {text!r}", at)
    return Connect(hostname=hostname, family=family, port=port, address=address)


def _ipv4_value(text: str) -> int | str:
    """A dotted quad's value, for the usual spelling (four decimal numbers up to 255, no
    leading zeros); anything else is left to :class:`ipaddress.IPv4Address` to judge. (The
    same result, a few times quicker: every connection's CONNECT carries one.)"""
    parts = text.split(".")
    if len(parts) != 4:
        return text
    value = 0
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or part[0] == "0" != part:
            return text
        number = int(part)
        if number > 255:
            return text
        value = value << 8 | number
    return value


def _address(
    family: AddressFamily, text: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str | None:
    """The address of a CONNECT of ``family``; None if ``text`` is not one.

    (The caller raises outside the ``except``, so that the error has no chained context in
    the compiled build too: mypyc does not apply ``raise ... from None``.)
    """
    try:
        if family is AddressFamily.INET:
            return ipaddress.IPv4Address(_ipv4_value(text))
        if family is AddressFamily.INET6:
            return ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return text


def _decode_envelope(r: Reader, model: type[EnvFrom] | type[EnvRcpt]) -> Event:
    argv = [decode_text(s) for s in r.strings("address or ESMTP argument")]
    if not argv:
        raise r.fail("address missing")
    values = {"address": strip_brackets(argv[0]), "raw": argv[0], "args": EsmtpArgs.parse(argv[1:])}
    return model.__pydantic_validator__.validate_python(values)  # type: ignore[no-any-return]


def _decode_header(r: Reader, leading_space: bool) -> Event:
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


def _empty(model: type[Event]) -> Callable[[Reader], Event]:
    def decode(r: Reader) -> Event:
        r.end()
        return model()

    return decode


_COMMAND_DECODERS: Final[dict[int, Callable[[Reader], Event]]] = {
    ord(Command.OPTNEG.value): _decode_optneg,
    ord(Command.MACRO.value): _decode_macro,
    ord(Command.CONNECT.value): _decode_connect,
    ord(Command.HELO.value): lambda r: Helo(name=single_string(r, "HELO name")),
    ord(Command.MAIL.value): lambda r: _decode_envelope(r, EnvFrom),
    ord(Command.RCPT.value): lambda r: _decode_envelope(r, EnvRcpt),
    ord(Command.DATA.value): _empty(Data),
    ord(Command.EOH.value): _empty(EndOfHeaders),
    ord(Command.BODY.value): lambda r: Body(chunk=r.payload),
    ord(Command.BODYEOB.value): lambda r: EndOfMessage(chunk=r.payload),
    ord(Command.UNKNOWN.value): lambda r: Unknown(line=single_string(r, "command line")),
    ord(Command.ABORT.value): _empty(Abort),
    ord(Command.QUIT.value): _empty(Quit),
    ord(Command.QUIT_NC.value): _empty(QuitNoClose),
}
# Commands without a payload decode to one shared instance each (the models are frozen).
_EMPTY_EVENTS: Final[dict[int, Event]] = {
    ord(model.command): model() for model in (Data, EndOfHeaders, EndOfMessage, Abort, Quit)
}
# The two most frequent models are validated straight from a dict: the same validation as
# Header(...), without the Python frame of BaseModel.__init__ (about a quarter of the cost).
_validate_header: Final[Callable[[dict[str, object]], Header]] = (
    Header.__pydantic_validator__.validate_python
)
_validate_body: Final[Callable[[dict[str, object]], Body]] = (
    Body.__pydantic_validator__.validate_python
)
_FAMILIES: Final = {family.value: family for family in AddressFamily}
#: Negotiation offers decoded, by their 12 bytes (a few MTAs, or versions, at most).
_OFFERS: Final[dict[bytes, Event]] = {}
_OFFERS_KEPT: Final = 16
_HEADER_BYTE: Final = ord(Command.HEADER.value)
_BODY_BYTE: Final = ord(Command.BODY.value)


def decode_command(command: int, payload: bytes, *, leading_space: bool = False) -> Event:
    """Decode one MTA command packet into its event model.

    Args:
        command: the command byte (``ord("M")``).
        payload: the bytes after the command byte.
        leading_space: HDR_LEADSPC was negotiated (recorded on :class:`Header` events).

    Raises:
        RemoteProtocolError: unknown command letter or malformed payload.
    """
    if command == _HEADER_BYTE:
        # The most frequent command, in its usual shape: no Reader needed.
        parts = payload.split(b"\x00")
        if len(parts) == 3 and parts[0] and not parts[2]:
            return _validate_header(
                {
                    "name": parts[0].decode("utf-8", "surrogateescape"),
                    "value": parts[1].decode("utf-8", "surrogateescape"),
                    "leading_space": leading_space,
                }
            )
    elif command == _BODY_BYTE:
        return _validate_body({"chunk": payload})
    elif not payload and (event := _EMPTY_EVENTS.get(command)) is not None:
        return event
    r = Reader(chr(command), payload)
    try:
        if command == _HEADER_BYTE:
            return _decode_header(r, leading_space)
        decoder = _COMMAND_DECODERS.get(command)
        if decoder is None:
            raise r.fail(f"unknown command byte 0x{command:02x}", 0)
        return decoder(r)
    except ValidationError as exc:
        problem = first_error(exc)
    raise r.fail(f"invalid content: {problem}", 0)  # outside the except: no chained context


# --- MTA -> milter: encoding (the MTA side) ----------------------------------------------


def _payload_connect(event: Connect) -> bytes:
    head = cstrings(event.hostname) + event.family.value.encode()
    if event.family is AddressFamily.UNKNOWN:
        return head
    return head + U16.pack(event.port or 0) + cstrings(str(event.address))


def _payload_macros(event: Macros) -> bytes:
    pairs = [part for item in event.values.items() for part in item]
    return event.stage.encode("latin-1") + cstrings(*pairs)


def _command_payload(event: Event) -> bytes:
    match event:
        case Negotiate():
            return OPTNEG.pack(event.version, event.actions, event.protocol)
        case Macros():
            return _payload_macros(event)
        case Connect():
            return _payload_connect(event)
        case Helo():
            return cstrings(event.name)
        case EnvFrom() | EnvRcpt():
            return cstrings(event.raw, *event.args.as_strings())
        case Header():
            return cstrings(event.name, event.value)
        case Body() | EndOfMessage():
            return event.chunk
        case Unknown():
            return cstrings(event.line)
        case Data() | EndOfHeaders() | Abort() | Quit() | QuitNoClose():
            return b""
    raise TypeError(f"{type(event).__name__} has no packet form")


def encode_command(event: Event) -> bytes:
    """Return the whole packet the MTA sends for ``event``.

    Raises:
        TypeError: the event has no packet form (:class:`~milterapp.events.ConnectionClosed`).
    """
    return encode_frame(event.command, _command_payload(event))
