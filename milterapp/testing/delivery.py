"""What the MTA delivers once it has applied a milter's modifications.

:func:`apply` replays modifications as the chosen MTA profile does (protocol reference §4,
§6) and returns a :class:`DeliveredMessage`: the envelope and the message as the MTA queues
it, before delivery agents add their own headers (Return-Path, Delivered-To...).
:func:`unified_diff` shows what changed.

Header values are kept as a milter without HDR_LEADSPC sees them: the text after the colon
without the one space the MTA writes there, so ``("Subject", "hi")`` is ``Subject: hi`` on
the wire and ``("Subject", " hi")`` is ``Subject:  hi``. Folded values keep ``\\n`` followed
by the continuation whitespace.
"""

from __future__ import annotations

import difflib
import email.policy
import re
from collections.abc import Iterable, Sequence
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Final

from pydantic import BaseModel, ConfigDict

from milterapp.chain.headers import HeaderField, HeaderList
from milterapp.events import decode_text, encode_text, strip_brackets
from milterapp.replies import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    ReplaceBody,
)
from milterapp.testing.profiles import MtaProfile

__all__ = [
    "DEFAULT_MTA_HEADERS",
    "DeliveredMessage",
    "apply",
    "parse_message",
    "unified_diff",
]

#: The MTA's own headers, above those the client sent; the milter never sees them (§3).
DEFAULT_MTA_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    (
        "Received",
        "from client.example (client.example [192.0.2.10])\n"
        "\tby mx.example.net with ESMTP id 4QZ1bX0abcz9sWX\n"
        "\tfor <rcpt@example.org>; Mon, 1 Jan 2024 00:00:00 +0000",
    ),
)

_BARE_LF: Final = re.compile(rb"(?<!\r)\n")


class DeliveredMessage(BaseModel):
    """The envelope and content an MTA delivers.

    ``sender`` and ``recipients`` have no angle brackets. ``headers`` are ``(name, value)``
    pairs in order, values without the space after the colon (see the module docstring).
    ``body`` has CRLF line endings. ``quarantine`` is the reason the milter gave; Postfix
    does not keep it (the message just goes to the hold queue), Sendmail does.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sender: str
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes
    quarantine: str | None = None

    def header(self, name: str) -> str | None:
        """Return the value of the first header called ``name`` (any case), or None."""
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        """Return the values of every header called ``name`` (any case), in order."""
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]

    def as_bytes(self) -> bytes:
        """Return the RFC 5322 message: ``Name: value`` lines, a blank line, the body (CRLF)."""
        lines = []
        for name, value in self.headers:
            line = f"{name}: {value}" if value else f"{name}:"
            lines.append(encode_text(line.replace("\n", "\r\n")) + b"\r\n")
        return b"".join(lines) + b"\r\n" + self.body

    def as_email(self) -> EmailMessage:
        """Return the message parsed by :mod:`email` with the modern default policy."""
        return BytesParser(EmailMessage, policy=email.policy.default).parsebytes(self.as_bytes())

    @classmethod
    def from_bytes(
        cls, data: bytes, *, sender: str, recipients: Sequence[str] = ()
    ) -> DeliveredMessage:
        """Build from a raw message (as :meth:`as_bytes` writes) and its envelope."""
        headers, body = parse_message(data)
        return cls(
            sender=strip_brackets(sender),
            recipients=tuple(strip_brackets(r) for r in recipients),
            headers=tuple(headers),
            body=body,
        )


def parse_message(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a raw message into ``(name, value)`` headers and a CRLF body.

    Values lose the one space after the colon and keep folds as ``\\n`` + whitespace;
    bytes that are not UTF-8 survive as surrogates (:func:`~milterapp.events.decode_text`).

    Raises:
        ValueError: a line in the header block is neither a header nor a continuation.
    """
    headers: list[tuple[str, str]] = []
    position = 0
    while position < len(data):
        end = data.find(b"\n", position)
        end = len(data) if end < 0 else end + 1
        line = data[position:end].removesuffix(b"\n").removesuffix(b"\r")
        position = end
        if not line:
            break  # the blank line: the body follows
        if line[:1] in (b" ", b"\t") and headers:
            previous, value = headers[-1]
            headers[-1] = (previous, value + "\n" + decode_text(line))
            continue
        raw_name, colon, raw_value = line.partition(b":")
        if not colon or not raw_name.strip():
            raise ValueError(f"not a header line: {line!r}")
        headers.append((decode_text(raw_name.strip()), decode_text(raw_value.removeprefix(b" "))))
    return headers, _crlf(data[position:])


def _crlf(body: bytes) -> bytes:
    # Both MTAs store the body as lines and write every line, the last one included, with
    # CRLF (§3: local LF becomes CRLF).
    body = _BARE_LF.sub(b"\r\n", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def _same_address(a: str, b: str) -> bool:
    # Local parts compare exactly, domains in any case (the MTAs' own rules differ in
    # detail: Postfix compares the recipient string, Sendmail parsed addresses).
    local_a, at_a, domain_a = a.rpartition("@")
    local_b, at_b, domain_b = b.rpartition("@")
    if not (at_a and at_b):
        return a == b
    return local_a == local_b and domain_a.lower() == domain_b.lower()


def apply(
    modifications: Iterable[Modification],
    *,
    sender: str,
    recipients: Sequence[str],
    headers: Sequence[tuple[str, str]],
    body: bytes,
    profile: MtaProfile,
    mta_headers: Sequence[tuple[str, str]] = DEFAULT_MTA_HEADERS,
    leading_space: bool = False,
) -> DeliveredMessage:
    """Apply modifications in order, as ``profile``'s MTA does, and return what it delivers.

    ``headers`` are those the milter saw, in the form of the module docstring;
    ``mta_headers`` are the MTA's own, above them, hidden from the milter. With
    ``leading_space`` (HDR_LEADSPC negotiated) a modification's value is taken as written
    after the colon: ``" x"`` gives ``Name: x``, stored as ``"x"``; ``"x"`` gives ``Name:x``,
    also stored as ``"x"`` (the one case this model does not tell apart).

    Raises:
        ValueError: body replacement interleaved with other modifications under a profile
            that refuses it (Postfix then fails the milter with 451 4.3.5, §4, §9).
    """

    def stored(value: str) -> str:
        return value.removeprefix(" ") if leading_space else value

    fields = [HeaderField(n, v.replace("\r\n", "\n"), visible=False) for n, v in mta_headers]
    fields += [HeaderField(n, v.replace("\r\n", "\n"), visible=True) for n, v in headers]
    edited = HeaderList(profile, fields)
    envelope_from = strip_brackets(sender)
    rcpts = [strip_brackets(r) for r in recipients]
    new_body: list[bytes] | None = None
    body_run_over = False  # a replacement run was followed by another modification
    quarantine: str | None = None
    for modification in modifications:
        if isinstance(modification, ReplaceBody):
            if body_run_over and profile.consecutive_body_replacement:
                raise ValueError(
                    f"{profile.name} refuses body replacement interleaved with other "
                    "modifications; send all ReplaceBody chunks together"
                )
            # The first chunk starts a new body, the next ones extend it.
            new_body = [*(new_body or []), modification.chunk]
            continue
        body_run_over = new_body is not None
        if isinstance(modification, AddHeader):
            edited.add(modification.name, stored(modification.value))
        elif isinstance(modification, InsertHeader):
            edited.insert(modification.index, modification.name, stored(modification.value))
        elif isinstance(modification, ChangeHeader):
            value = stored(modification.value) if modification.value else None
            edited.change(modification.index, modification.name, value)
        elif isinstance(modification, AddRecipient):
            address = strip_brackets(modification.address)  # ESMTP args do not show
            if not any(_same_address(address, r) for r in rcpts):
                rcpts.append(address)
        elif isinstance(modification, DeleteRecipient):
            address = strip_brackets(modification.address)
            rcpts = [r for r in rcpts if not _same_address(address, r)]
        elif isinstance(modification, ChangeSender):
            envelope_from = strip_brackets(modification.address)
        elif isinstance(modification, Quarantine):
            quarantine = modification.reason  # the last one wins in both MTAs
        else:
            raise TypeError(f"not a modification: {modification!r}")
    return DeliveredMessage(
        sender=envelope_from,
        recipients=tuple(rcpts),
        headers=edited.result(),
        body=_crlf(body if new_body is None else b"".join(new_body)),
        quarantine=quarantine,
    )


def _lines(message: DeliveredMessage) -> list[str]:
    envelope = [f"MAIL FROM:<{message.sender}>"]
    envelope += [f"RCPT TO:<{r}>" for r in message.recipients]
    if message.quarantine is not None:
        envelope.append(f"QUARANTINE: {message.quarantine}")
    return [*envelope, "", *message.as_bytes().decode("utf-8", "replace").splitlines()]


def unified_diff(
    before: DeliveredMessage,
    after: DeliveredMessage,
    *,
    fromfile: str = "before",
    tofile: str = "after",
) -> str:
    """Return a unified diff of two deliveries: envelope lines, a blank line, the message.

    The envelope is written as ``MAIL FROM:<...>`` and one ``RCPT TO:<...>`` per recipient
    (plus ``QUARANTINE: reason``); empty when nothing differs.
    """
    diff = difflib.unified_diff(
        _lines(before), _lines(after), fromfile=fromfile, tofile=tofile, lineterm=""
    )
    text = "\n".join(diff)
    return text + "\n" if text else ""
