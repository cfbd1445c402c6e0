"""Models of what a milter sends back: verdicts, modifications and the negotiation reply.

Every model is frozen and validated on construction, so a reply that the MTA would refuse
(a reply code of the wrong class, a header name with a colon, a value that would inject a
header line) fails where it is built, with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, ClassVar, Final, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from milterapp.constants import (
    MAX_REPLY_LINE_LENGTH,
    MAX_REPLY_LINES,
    MAX_VERSION,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
)
from milterapp.events import repr_args

__all__ = [
    "Accept",
    "AddHeader",
    "AddRecipient",
    "ChangeHeader",
    "ChangeSender",
    "Continue",
    "DeleteRecipient",
    "Discard",
    "InsertHeader",
    "Modification",
    "NegotiationReply",
    "Progress",
    "Quarantine",
    "Reject",
    "ReplaceBody",
    "Reply",
    "Shutdown",
    "Skip",
    "TempFail",
    "Verdict",
    "decide",
]

_XCODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# An enhanced status code written at the start of the text instead of in ``xcode``.
_LEADING_XCODE = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")
# RFC 5322 field names: printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")


class _Response(BaseModel):
    """Base of every reply.

    ``repr()`` and ``str()`` show the class and the fields that are set, those that differ
    from their default: ``TempFail(code=451, xcode='4.3.0', text='try later')``,
    ``Continue()``, ``AddHeader(name='X-A', value='1')``; long bytes are cut short.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Action flag the MTA must have granted before this can be sent.
    action: ClassVar[ActionFlag] = ActionFlag.NONE

    def __repr_args__(self) -> Iterator[tuple[str, Any]]:
        return repr_args(self)

    def __str__(self) -> str:
        return self.__repr__()

    @property
    def required_action(self) -> ActionFlag:
        """The action flag this response needs (``NONE`` for verdicts)."""
        return self.action


class Continue(_Response):
    """Go on with the next step (at end of message: accept)."""


class Accept(_Response):
    """Accept: the message (or, at connect and HELO, the connection); no more events for it."""


class Discard(_Response):
    """Accept the message from the client but throw it away (message stages only)."""


class Skip(_Response):
    """Send no more body chunks; go on to end of message (after a body chunk, needs SKIP)."""


class Progress(_Response):
    """Still working: restarts the MTA's timer while end of message is being handled."""


class Shutdown(_Response):
    """Ask the MTA to answer the SMTP client with 421 and close its session.

    Only Postfix does, before the content (from 3.11 at every stage); the server sends
    TempFail instead wherever Shutdown would lose or pass the message (docs/handlers.md).
    """


def _check_line(line: str) -> str:
    if "\r" in line or "\x00" in line:
        raise ValueError("reply text must not contain CR or NUL; give lines separated by \\n")
    # libmilter counts bytes, after the % escaping that goes on the wire.
    if len(line.replace("%", "%%").encode("utf-8", "surrogateescape")) > MAX_REPLY_LINE_LENGTH:
        raise ValueError(f"reply line longer than {MAX_REPLY_LINE_LENGTH} bytes")
    return line


class _ErrorReply(_Response):
    """A refusal, optionally with its own SMTP reply (sent as a reply-code packet)."""

    first_digit: ClassVar[str] = "5"
    default_code: ClassVar[int] = 550

    code: int | None = None
    xcode: str | None = None
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        # Lines may come as a list; an empty text is no text; a reply with text or xcode
        # but no code gets the default code, so that equal replies compare equal.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("text"), list | tuple):
            data["text"] = "\n".join(data["text"])
        if data.get("text") == "":
            data["text"] = None
        text = data.get("text")
        if data.get("xcode") is None and isinstance(text, str):
            # "5.7.1 go away" as text: the MTA reads it as the enhanced code, so treat it so.
            found = _LEADING_XCODE.match(text)
            if found:
                data["xcode"] = found.group(1)
                data["text"] = text[found.end() :] or None
        if data.get("code") is None and (data.get("text") is not None or data.get("xcode")):
            data["code"] = cls.default_code
        return data

    @model_validator(mode="after")
    def _check(self) -> _ErrorReply:
        kind = type(self).__name__
        if self.code is not None and not (
            100 * int(self.first_digit) <= self.code < 100 * (int(self.first_digit) + 1)
        ):
            raise ValueError(f"{kind} code must be {self.first_digit}xx, not {self.code}")
        if self.xcode is not None:
            if not _XCODE.fullmatch(self.xcode):
                raise ValueError(f"xcode must look like {self.first_digit}.7.1, not {self.xcode!r}")
            if self.xcode[0] != self.first_digit:
                raise ValueError(
                    f"{kind} xcode must start with {self.first_digit}, not {self.xcode!r}"
                )
        if self.text is not None:
            lines = self.text.split("\n")
            if len(lines) > MAX_REPLY_LINES:
                raise ValueError(f"reply text has {len(lines)} lines; at most {MAX_REPLY_LINES}")
            for line in lines:
                _check_line(line)
        return self

    @property
    def has_reply_text(self) -> bool:
        """True when this refusal carries its own SMTP reply (sent as ``y``)."""
        return self.code is not None or self.xcode is not None or self.text is not None

    def smtp_lines(self) -> list[str]:
        """Return the SMTP reply lines as the MTA will send them, ``%`` not yet escaped."""
        code = str(self.default_code if self.code is None else self.code)
        lines = (self.text or "").split("\n")
        out = []
        for number, line in enumerate(lines):
            sep = " " if number == len(lines) - 1 else "-"
            rest = " ".join(part for part in (self.xcode, line) if part)
            out.append(f"{code}{sep}{rest}")
        return out


class Reject(_ErrorReply):
    """Refuse with a permanent error (5xx): the connection, the message or one recipient."""

    first_digit: ClassVar[str] = "5"
    default_code: ClassVar[int] = 550


class TempFail(_ErrorReply):
    """Refuse with a temporary error (4xx); 421 also ends the SMTP session."""

    first_digit: ClassVar[str] = "4"
    default_code: ClassVar[int] = 451


def _check_header_name(name: str) -> str:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(
            f"header name {name!r} must be non-empty printable ASCII without colon or space"
        )
    return name


def _check_header_value(value: str) -> str:
    if "\x00" in value or "\r" in value:
        raise ValueError("header value must not contain NUL or CR; fold with \\n + space")
    for continuation in value.split("\n")[1:]:
        if continuation[:1] not in (" ", "\t"):
            raise ValueError(
                "a line break in a header value must be followed by a space or tab "
                "(otherwise it would start a new header)"
            )
    return value


def _check_address(value: str) -> str:
    if not value or "\x00" in value or "\r" in value or "\n" in value:
        raise ValueError("address must be non-empty, without NUL or line breaks")
    return value


def _check_args(value: str | None) -> str | None:
    if value is not None and ("\x00" in value or "\r" in value or "\n" in value):
        raise ValueError("ESMTP arguments must not contain NUL or line breaks")
    return value


HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
Address = Annotated[str, AfterValidator(_check_address)]
EsmtpArgString = Annotated[str | None, AfterValidator(_check_args)]


class _HeaderEdit(_Response):
    name: HeaderName
    value: HeaderValue


class AddHeader(_HeaderEdit):
    """Append a header at the end of the header block (needs ADDHDRS)."""

    action: ClassVar[ActionFlag] = ActionFlag.ADDHDRS


class InsertHeader(_HeaderEdit):
    """Insert a header at ``index`` (0 = top, before the MTA's own Received:; needs ADDHDRS)."""

    action: ClassVar[ActionFlag] = ActionFlag.ADDHDRS

    index: int = Field(ge=0, le=0xFFFFFFFF)


class ChangeHeader(_HeaderEdit):
    """Change the ``index``-th header called ``name`` (1-based); empty value deletes it.

    Needs CHGHDRS.
    """

    action: ClassVar[ActionFlag] = ActionFlag.CHGHDRS

    index: int = Field(default=1, ge=0, le=0xFFFFFFFF)


class AddRecipient(_Response):
    """Add an envelope recipient; with ``args`` it needs ADDRCPT_PAR, otherwise ADDRCPT."""

    address: Address
    args: EsmtpArgString = None

    @property
    def required_action(self) -> ActionFlag:
        """ADDRCPT_PAR when ESMTP arguments are given, ADDRCPT otherwise."""
        return ActionFlag.ADDRCPT if self.args is None else ActionFlag.ADDRCPT_PAR


class DeleteRecipient(_Response):
    """Remove an envelope recipient, named as the MTA sent it (needs DELRCPT)."""

    action: ClassVar[ActionFlag] = ActionFlag.DELRCPT

    address: Address


class ChangeSender(_Response):
    """Replace the envelope sender, optionally with ESMTP arguments (needs CHGFROM)."""

    action: ClassVar[ActionFlag] = ActionFlag.CHGFROM

    address: Address
    args: EsmtpArgString = None


class ReplaceBody(_Response):
    """Replace the body; several in a row build the new body (needs CHGBODY).

    The codec splits ``chunk`` into packets no larger than the negotiated maximum.
    """

    action: ClassVar[ActionFlag] = ActionFlag.CHGBODY

    chunk: bytes


class Quarantine(_Response):
    """Hold the message in the MTA's quarantine with ``reason`` (needs QUARANTINE)."""

    action: ClassVar[ActionFlag] = ActionFlag.QUARANTINE

    reason: str

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str) -> str:
        if not value or "\x00" in value or "\r" in value or "\n" in value:
            raise ValueError("quarantine reason must be non-empty, without NUL or line breaks")
        return value


class NegotiationReply(_Response):
    """The milter's answer to option negotiation (``O``).

    ``macros`` maps a stage to the macro names the MTA should send before that stage's
    command; an empty list asks for none (Sendmail 8.15.2+).
    """

    version: int = Field(default=MAX_VERSION, ge=0, le=0xFFFFFFFF)
    actions: ActionFlag = ActionFlag.NONE
    protocol: ProtocolFlag = ProtocolFlag.NONE
    macros: dict[MacroStage, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("macros")
    @classmethod
    def _check_macros(
        cls, value: dict[MacroStage, tuple[str, ...]]
    ) -> dict[MacroStage, tuple[str, ...]]:
        for stage, names in value.items():
            for name in names:
                if not name or any(c == "," or c.isspace() or not c.isprintable() for c in name):
                    raise ValueError(
                        f"macro name {name!r} for stage {stage.name} must be non-empty, "
                        "printable, without whitespace or commas"
                    )
        return value


#: Replies that end the handling of one command.
Verdict: TypeAlias = Continue | Accept | Reject | TempFail | Discard | Skip
#: Replies valid only during end of message, before the verdict.
Modification: TypeAlias = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | DeleteRecipient
    | ChangeSender
    | ReplaceBody
    | Quarantine
)
#: Everything a milter can send.
Reply: TypeAlias = Verdict | Modification | Progress | Shutdown | NegotiationReply


#: Verdicts that end the handler chain at once.
RESTRICTIVE: tuple[type[_Response], ...] = (Reject, TempFail, Discard, Shutdown)


_CONTINUE: Final = Continue()


def decide(results: Iterable[Verdict | Shutdown | None]) -> Verdict | Shutdown:
    """Combine the replies of several handlers of one event, in registration order.

    The first restrictive verdict (Reject, TempFail, Discard, Shutdown) wins and the rest of
    ``results`` is not consumed, so a generator that runs handlers lazily stops there.
    Otherwise: Accept if any handler accepted; Skip if every handler skipped; else Continue
    (None, "no opinion", counts as Continue).
    """
    accepted: Accept | None = None
    skip: Skip | None = None
    skips = 0
    count = 0
    for result in results:
        count += 1
        if isinstance(result, RESTRICTIVE):
            return result
        if isinstance(result, Accept):
            accepted = result
        elif isinstance(result, Skip):
            skip = result
            skips += 1
    # One of the handlers' own replies where one fits: replies are frozen, and a new model
    # costs as much as the rest of a message's end.
    if accepted is not None:
        return accepted
    if skip is not None and skips == count:
        return skip
    return _CONTINUE
