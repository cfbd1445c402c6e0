"""Milter responses: reply models to packets (the milter side) and back (the MTA side).

Decoding errors are :class:`RemoteProtocolError`s naming the response letter, the field and
the byte offset, as for commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, Final

from pydantic import ValidationError

from milterapp.constants import (
    DEFAULT_MAX_DATA_SIZE,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
    ResponseCode,
)
from milterapp.events import (
    decode_text,
)
from milterapp.protocol.framing import encode_frame
from milterapp.protocol.payload import (
    OPTNEG,
    REPLY_CODE,
    U32,
    XCODE_PREFIX,
    Reader,
    cstrings,
    first_error,
    single_string,
)
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

__all__ = ["body_chunks", "decode_response", "encode_response", "split_body"]


# --- milter -> MTA: encoding -------------------------------------------------------------


def _reply_text(reply: Reject | TempFail) -> bytes:
    lines = [line.replace("%", "%%") for line in reply.smtp_lines()]
    return cstrings("\r\n".join(lines))


def body_chunks(
    body: bytes | IO[bytes], max_data_size: int = DEFAULT_MAX_DATA_SIZE
) -> Iterator[bytes]:
    """Yield a replacement body in chunks of at most ``max_data_size`` bytes.

    ``body`` is bytes, or a binary file read as the chunks are taken (so that a large body
    is never all in memory). An empty body is one empty chunk, so that the MTA still
    replaces the body.
    """
    if isinstance(body, bytes):
        if not body:
            yield b""
            return
        view = memoryview(body)
        for start in range(0, len(body), max_data_size):
            yield bytes(view[start : start + max_data_size])
        return
    first = True
    while (chunk := body.read(max_data_size)) or first:
        first = False
        yield chunk
        if not chunk:
            return


def split_body(body: bytes, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> list[bytes]:
    """The chunks of a replacement body given as bytes (see :func:`body_chunks`)."""
    return list(body_chunks(body, max_data_size))


def _negotiation_payload(reply: NegotiationReply) -> bytes:
    # A server answers each offer with one reply object, connection after connection: its
    # payload is encoded once (by identity: the model holds a dict, so it has no hash).
    known = _NEGOTIATION_PAYLOADS.get(id(reply))
    if known is not None and known[0] is reply:
        return known[1]
    lists = (
        U32.pack(stage) + cstrings(" ".join(reply.macros[stage])) for stage in sorted(reply.macros)
    )
    payload = OPTNEG.pack(reply.version, reply.actions, reply.protocol) + b"".join(lists)
    if len(_NEGOTIATION_PAYLOADS) >= _NEGOTIATION_PAYLOADS_KEPT:
        _NEGOTIATION_PAYLOADS.clear()
    # The reply is kept with its payload, so that its id cannot be reused meanwhile.
    _NEGOTIATION_PAYLOADS[id(reply)] = (reply, payload)
    return payload


_NEGOTIATION_PAYLOADS: Final[dict[int, tuple[NegotiationReply, bytes]]] = {}
_NEGOTIATION_PAYLOADS_KEPT: Final = 16


_EMPTY_RESPONSES: Final[dict[type[Reply], bytes]] = {
    Continue: ResponseCode.CONTINUE.value,
    Accept: ResponseCode.ACCEPT.value,
    Discard: ResponseCode.DISCARD.value,
    Skip: ResponseCode.SKIP.value,
    Progress: ResponseCode.PROGRESS.value,
    Shutdown: ResponseCode.SHUTDOWN.value,
}


_MACRO_STAGES: Final = {int(stage): stage for stage in MacroStage}
_EMPTY_PACKETS: Final = {cls: encode_frame(code) for cls, code in _EMPTY_RESPONSES.items()}


def _response_packet(reply: Reply) -> tuple[bytes, bytes]:
    match reply:
        case Reject() | TempFail() if reply.has_reply_text:
            return ResponseCode.REPLYCODE.value, _reply_text(reply)
        case Reject():
            return ResponseCode.REJECT.value, b""
        case TempFail():
            return ResponseCode.TEMPFAIL.value, b""
        case AddHeader():
            return ResponseCode.ADDHEADER.value, cstrings(reply.name, reply.value)
        case InsertHeader():
            return ResponseCode.INSHEADER.value, U32.pack(reply.index) + cstrings(
                reply.name, reply.value
            )
        case ChangeHeader():
            return ResponseCode.CHGHEADER.value, U32.pack(reply.index) + cstrings(
                reply.name, reply.value
            )
        case AddRecipient() if reply.args is None:
            return ResponseCode.ADDRCPT.value, cstrings(reply.address)
        case AddRecipient():
            return ResponseCode.ADDRCPT_PAR.value, cstrings(reply.address, reply.args or "")
        case DeleteRecipient():
            return ResponseCode.DELRCPT.value, cstrings(reply.address)
        case ChangeSender():
            args = () if reply.args is None else (reply.args,)
            return ResponseCode.CHGFROM.value, cstrings(reply.address, *args)
        case Quarantine():
            return ResponseCode.QUARANTINE.value, cstrings(reply.reason)
        case NegotiationReply():
            return ResponseCode.OPTNEG.value, _negotiation_payload(reply)
    raise TypeError(f"{type(reply).__name__} is not a milter response")


def encode_response(reply: Reply, *, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> bytes:
    """Return the packet(s) the milter sends for ``reply``.

    :class:`ReplaceBody` becomes as many ``b`` packets as ``max_data_size`` requires.
    """
    packet = _EMPTY_PACKETS.get(type(reply))
    if packet is not None:
        return packet
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


def _decode_reply_code(r: Reader) -> Reply:
    text = decode_text(r.string("reply text"))
    r.end()
    lines = text.split("\r\n")
    code = lines[0][:3]
    if not REPLY_CODE.fullmatch(code) or lines[0][3:4] not in ("", " ", "-"):
        raise r.fail(f"reply must start with a 4xx or 5xx code, not {lines[0][:4]!r}", 0)
    rests = [_strip_prefix(line, code) for line in lines]
    found = XCODE_PREFIX.match(rests[0])
    xcode = found.group(1) if found else None
    # An enhanced code belongs to the reply only when every line carries it (as ours do).
    if xcode is not None and all(XCODE_PREFIX.match(rest) for rest in rests):
        rests = [_strip_prefix(rest, xcode) for rest in rests]
    else:
        xcode = None
    model = TempFail if code[0] == "4" else Reject
    return model(code=int(code), xcode=xcode, text="\n".join(rests).replace("%%", "%"))


def _decode_optneg_reply(r: Reader) -> Reply:
    if len(r.payload) < OPTNEG.size:
        raise r.fail(f"negotiation reply is {len(r.payload)} bytes; needs at least 12")
    version, actions, protocol = OPTNEG.unpack_from(r.payload)
    r.pos = OPTNEG.size
    macros: dict[MacroStage, tuple[str, ...]] = {}
    while r.pos < len(r.payload):
        at = r.pos
        number = r.uint(U32, "macro stage")
        stage = _MACRO_STAGES.get(number)
        if stage is None:
            raise r.fail(f"unknown macro stage {number}", at)
        names = decode_text(r.string("macro list")).replace(",", " ").split()
        macros[stage] = tuple(names)
    return NegotiationReply(
        version=version,
        actions=ActionFlag(actions),
        protocol=ProtocolFlag(protocol),
        macros=macros,
    )


def _decode_header_edit(r: Reader, model: type[InsertHeader] | type[ChangeHeader]) -> Reply:
    index = r.uint(U32, "header index")
    name, value = (decode_text(r.string(f)) for f in ("header name", "header value"))
    r.end()
    return model(index=index, name=name, value=value)


def _decode_address_args(r: Reader, model: type[AddRecipient] | type[ChangeSender]) -> Reply:
    values = [decode_text(s) for s in r.strings("address or arguments")]
    if not values or len(values) > 2:
        raise r.fail(f"expected an address and optional arguments, got {len(values)} strings", 0)
    return model(address=values[0], args=values[1] if len(values) == 2 else None)


def _decode_add_header(r: Reader) -> Reply:
    name, value = (decode_text(r.string(f)) for f in ("header name", "header value"))
    r.end()
    return AddHeader(name=name, value=value)


def _no_payload(
    model: type[Continue | Accept | Reject | TempFail | Discard | Skip | Progress | Shutdown],
) -> Callable[[Reader], Reply]:
    shared = model()  # replies are frozen: one instance serves every packet

    def decode(r: Reader) -> Reply:
        if r.payload:
            raise r.fail(f"response carries {len(r.payload)} unexpected bytes", 0)
        return shared

    return decode


_RESPONSE_DECODERS: Final[dict[int, Callable[[Reader], Reply]]] = {
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
    ord(ResponseCode.ADDRCPT.value): lambda r: AddRecipient(address=single_string(r, "recipient")),
    ord(ResponseCode.ADDRCPT_PAR.value): lambda r: _decode_address_args(r, AddRecipient),
    ord(ResponseCode.DELRCPT.value): lambda r: DeleteRecipient(
        address=single_string(r, "recipient")
    ),
    ord(ResponseCode.CHGFROM.value): lambda r: _decode_address_args(r, ChangeSender),
    ord(ResponseCode.REPLBODY.value): lambda r: ReplaceBody(chunk=r.payload),
    ord(ResponseCode.QUARANTINE.value): lambda r: Quarantine(
        reason=single_string(r, "quarantine reason")
    ),
}


def decode_response(command: int, payload: bytes) -> Reply:
    """Decode one milter response packet into its model (the MTA side).

    Raises:
        RemoteProtocolError: unknown response letter or malformed payload.
    """
    r = Reader(chr(command), payload)
    decoder = _RESPONSE_DECODERS.get(command)
    if decoder is None:
        raise r.fail(f"unknown response byte 0x{command:02x}", 0)
    try:
        return decoder(r)
    except ValidationError as exc:
        problem = first_error(exc)
    raise r.fail(f"invalid content: {problem}", 0)  # outside the except: no chained context
