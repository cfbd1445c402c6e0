"""One mail transaction as the handlers see it: :class:`Message` (``ctx.message``).

The envelope, the headers and, when the app keeps whole messages, the body, spooled to a
temporary file past a threshold; the app's own per-message state. The server records what
the MTA sends: models, or the payloads of commands that no handler reads as they come, which
are decoded here when first read.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, Final, Generic

from typing_extensions import TypeVar

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, Command
from milterapp.errors import NotAvailable
from milterapp.events import EnvFrom, EnvRcpt, Event, Header
from milterapp.protocol.commands import decode_command
from milterapp.protocol.stages import OptionalEvent

if TYPE_CHECKING:
    from email.message import EmailMessage

__all__ = ["KEPT_EVENTS", "RECORDED_EVENTS", "Message", "MessageStateT", "decoded"]

#: The events whose facts every context holds (``client``, ``helo``, ``message.sender`` and
#: ``message.recipients``): the MTA is asked for them whatever handlers the app has.
RECORDED_EVENTS: Final[frozenset[OptionalEvent]] = frozenset(
    {"connect", "helo", "envfrom", "envrcpt"}
)
#: The events that whole messages add (``App(keep_message=True)``): headers and body.
KEPT_EVENTS: Final[frozenset[OptionalEvent]] = frozenset({"header", "body"})

_READ_SIZE: Final = DEFAULT_MAX_DATA_SIZE
_MAIL, _RCPT, _HEADER = (
    ord(command.value) for command in (Command.MAIL, Command.RCPT, Command.HEADER)
)
_E = TypeVar("_E", bound=Event)
_UNSET: Final = object()

#: The type of ``ctx.message.state``: the app's ``message_state`` class (a dict by default).
MessageStateT = TypeVar("MessageStateT", default=dict[str, Any])


class Message(Generic[MessageStateT]):
    """One mail transaction: envelope, headers and (when kept) the body.

    ``state`` is this message's own data: an instance of the app's ``message_state`` class
    (a dict unless the app declares one), made when first used. Free attributes work too
    (``ctx.message.score = 5``); both live as long as the message.

    ``sender`` and ``recipients`` are always known from MAIL FROM on (the MTA is always
    asked for them);
    ``headers`` when the app has a ``header`` handler or keeps whole messages; the body only
    when it keeps whole messages (``App(keep_message=True)``). Reading what was not asked
    for raises :class:`~milterapp.errors.NotAvailable` saying what to change.
    """

    def __init__(
        self,
        macros: Mapping[str, str],
        spool_threshold: int | None,
        *,
        headers_kept: bool = True,
        new_state: Callable[[], Any] = dict,
    ) -> None:
        # The envelope as the server recorded it: models, or payloads of commands that no
        # handler read as they came (decoded when first read here).
        # The server writes these three in place (an attribute costs compiled code far less
        # than a call into this module); handlers read sender and recipients.
        #: MAIL FROM as recorded: a model, or the payload (None before MAIL).
        self.sender_record: EnvFrom | bytes | None = None
        #: The recipients as recorded: models, or RCPT payloads.
        self.recipient_records: list[EnvRcpt | bytes] = []
        #: Whether recipient_records may hold payloads (set by whoever appends one).
        self.records_undecoded = False
        self.body_size = 0
        # For the message's log line (milterapp/server/outcomes.py), kept by the server.
        #: When MAIL came (time.perf_counter(), the clock of handler_seconds); 0 before.
        self.started = 0.0
        #: Recipients refused, by a handler, a limit or the MTA.
        self.refused_recipients = 0
        #: Time from each event's arrival to its reply, summed.
        self.handler_seconds = 0.0
        #: Modifications sent, by kind.
        self.modifications_sent: dict[str, int] = {}
        #: Every header received, in order (the server appends here): a model, or the
        #: payload of a command no handler read as it came (decoded when first read here,
        #: with or without its leading space as ``headers_leading_space`` says).
        #: :attr:`headers` gives them when the app asked for headers.
        self.header_records: list[Header | bytes] = []
        #: Whether header_records may hold payloads (set by whoever appends one).
        self.headers_undecoded = False
        self.headers_leading_space = False
        self._headers_kept = headers_kept
        self._macros = macros
        self._spool_threshold = spool_threshold
        self._body: IO[bytes] | None = None
        self._new_state = new_state
        self._state: Any = _UNSET

    # Free attributes are part of the API (ctx.message.score = 5): these tell type checkers
    # so. They are declared for them only: a class that defines __getattr__ slows every
    # attribute read of its instances (the interpreter cannot specialise them), some 2 % of
    # an end-of-message-only app's time. A typo raises AttributeError, to which a handler's
    # failure adds how to set the attribute or declare it (milterapp/handlers.py).
    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

    @property
    def state(self) -> MessageStateT:
        """This message's own data: a fresh instance of the app's ``message_state``."""
        state = self._state
        if state is _UNSET:
            state = self._state = self._new_state()
        return state  # type: ignore[no-any-return]

    @property
    def sender(self) -> EnvFrom:
        """The MAIL FROM event of this transaction.

        Raises:
            NotAvailable: read before the MTA sent MAIL FROM (in a ``connect`` or ``helo``
                handler, or between messages).
        """
        sender = self.sender_record
        if sender is None:
            raise NotAvailable(
                "ctx.message.sender is not known before MAIL FROM; read it from 'envfrom' on"
            )
        if isinstance(sender, bytes):
            sender = self.sender_record = decoded(_MAIL, sender, EnvFrom)
        return sender

    @sender.setter
    def sender(self, value: EnvFrom) -> None:
        self.sender_record = value

    @property
    def recipients(self) -> list[EnvRcpt]:
        """The recipients accepted so far, refused ones left out: in an ``envrcpt`` handler,
        those before the one being checked."""
        recipients = self.recipient_records
        if self.records_undecoded:
            for at, recipient in enumerate(recipients):
                if isinstance(recipient, bytes):
                    recipients[at] = decoded(_RCPT, recipient, EnvRcpt)
            self.records_undecoded = False
        # Every item is a model now: the list is handed out as it is, for handlers to edit.
        return recipients  # type: ignore[return-value]

    @property
    def begun(self) -> bool:
        """Whether the MTA has sent anything of this transaction yet."""
        return self.sender_record is not None or bool(self.recipient_records or self.header_records)

    @property
    def queue_id(self) -> str | None:
        """The MTA's queue id (macro ``i``) once the MTA has sent it."""
        return self._macros.get("i")

    @property
    def headers(self) -> list[Header]:
        """The headers seen so far, in order.

        Raises:
            NotAvailable: the app has no ``header`` handler and does not keep messages.
        """
        if not self._headers_kept:
            raise NotAvailable(
                "ctx.message.headers: the MTA was not asked for headers; add a 'header' "
                "handler or create the App with keep_message=True"
            )
        headers = self.header_records
        if self.headers_undecoded:
            for at, header in enumerate(headers):
                if isinstance(header, bytes):
                    event = decode_command(
                        _HEADER, header, leading_space=self.headers_leading_space
                    )
                    assert isinstance(event, Header)
                    headers[at] = event
            self.headers_undecoded = False
        return headers  # type: ignore[return-value]  # (every item is a model now)

    def append_body(self, chunk: bytes) -> None:
        """Keep a body chunk (only when the app keeps whole messages)."""
        self.body_size += len(chunk)
        if self._spool_threshold is None:
            return
        if self._body is None:
            self._body = tempfile.SpooledTemporaryFile(max_size=self._spool_threshold)  # noqa: SIM115 - closed by close()
            if self._spool_threshold == 0:  # max_size=0 would mean "never roll over"
                self._body.rollover()
        self._body.seek(0, io.SEEK_END)  # body() may have rewound it
        self._body.write(chunk)

    @property
    def body_kept(self) -> bool:
        """True when the body is available (the app keeps whole messages)."""
        return self._spool_threshold is not None

    def body(self) -> IO[bytes]:
        """Return the body as a binary file positioned at its start (CRLF line endings).

        Raises:
            NotAvailable: the app does not keep whole messages.
        """
        if self._spool_threshold is None:
            raise NotAvailable(
                "ctx.message.body(): the body is not kept; create the App with keep_message=True"
            )
        if self._body is None:
            return io.BytesIO()
        self._body.seek(0)
        return self._body

    def body_bytes(self) -> bytes:
        """Return the whole body in memory (mind large messages: prefer :meth:`body`).

        Raises:
            NotAvailable: the app does not keep whole messages.
        """
        return self.body().read()

    def as_email(self) -> EmailMessage:
        """Parse the headers and the kept body into a standard-library EmailMessage.

        Raises:
            NotAvailable: the app does not keep whole messages.
        """
        if not self.body_kept:
            raise NotAvailable(
                "ctx.message.as_email() needs the whole message; create the App with "
                "keep_message=True"
            )
        import email.parser  # the email package's parser only once a handler asks for it
        import email.policy
        from email.message import EmailMessage

        feeder = email.parser.BytesFeedParser(policy=email.policy.default)
        for header in self.headers:
            # Without HDR_LEADSPC the MTA removed the space after the colon: put it back.
            separator = b":" if header.leading_space else b": "
            feeder.feed(header.raw_name + separator + header.raw_value + b"\n")
        feeder.feed(b"\n")
        # The body comes with CRLF line endings; the email package works with LF.
        body, carry = self.body(), b""
        while chunk := body.read(_READ_SIZE):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""
            feeder.feed(chunk[: len(chunk) - len(carry)].replace(b"\r\n", b"\n"))
        feeder.feed(carry)
        result = feeder.close()
        assert isinstance(result, EmailMessage)
        return result

    def close(self) -> None:
        """Release the spooled body."""
        if self._body is not None:
            self._body.close()
            self._body = None


def decoded(command: int, payload: bytes, kind: type[_E]) -> _E:
    """Decode the payload of a command that the server kept undecoded."""
    event = decode_command(command, payload)
    assert isinstance(event, kind)
    return event
