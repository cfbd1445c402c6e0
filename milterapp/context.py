"""What a handler knows about its connection and message, and how it asks for changes.

One :class:`Context` per MTA connection (one SMTP session); one :class:`Message` per mail
transaction inside it, replaced at each new message and at abort. Modifications are queued
on the context at end of message and sent by the server before the verdict.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from email.message import EmailMessage
from typing import IO, TYPE_CHECKING, Any, Final, Generic

import structlog
from typing_extensions import TypeVar

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, ActionFlag, Command
from milterapp.errors import ActionNotNegotiated, LocalProtocolError, NotAvailable
from milterapp.events import Connect, EnvFrom, EnvRcpt, Event, Header, Helo
from milterapp.protocol.commands import decode_command
from milterapp.protocol.negotiation import SessionOptions
from milterapp.protocol.responses import body_chunks
from milterapp.protocol.stages import OptionalEvent
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

__all__ = ["KEPT_EVENTS", "RECORDED_EVENTS", "Context", "Message"]

#: The events whose facts every context holds (``client``, ``helo``, ``message.sender`` and
#: ``message.recipients``): the MTA is asked for them whatever handlers the app has.
RECORDED_EVENTS: Final[frozenset[OptionalEvent]] = frozenset(
    {"connect", "helo", "envfrom", "envrcpt"}
)
#: The events that whole messages add (``App(keep_message=True)``): headers and body.
KEPT_EVENTS: Final[frozenset[OptionalEvent]] = frozenset({"header", "body"})

_READ_SIZE: Final = DEFAULT_MAX_DATA_SIZE
_CONNECT, _HELO, _MAIL, _RCPT = (
    ord(command.value) for command in (Command.CONNECT, Command.HELO, Command.MAIL, Command.RCPT)
)
_E = TypeVar("_E", bound=Event)
_UNSET: Final = object()

#: The type of ``ctx.message.state``: the app's ``message_state`` class (a dict by default).
MessageStateT = TypeVar("MessageStateT", default=dict[str, Any])
#: The type of ``ctx.state``: the app's ``connection_state`` class (a dict by default).
ConnectionStateT = TypeVar("ConnectionStateT", default=dict[str, Any])


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
        self._sender: EnvFrom | bytes | None = None
        #: The recipients as recorded: models, or RCPT payloads (the server appends here).
        self.recipient_records: list[EnvRcpt | bytes] = []
        self._undecoded_recipients = False
        self.body_size = 0
        #: Every Header event received (the server appends here); :attr:`headers` gives it
        #: when the app asked for headers.
        self.header_events: list[Header] = []
        self._headers_kept = headers_kept
        self._macros = macros
        self._spool_threshold = spool_threshold
        self._body: IO[bytes] | None = None
        self._new_state = new_state
        self._state: Any = _UNSET

    # Own attributes are part of the API (ctx.message.score = 5): __getattr__ makes a typo a
    # clear error, and with __setattr__ tells type checkers so. __setattr__ is declared for
    # them only: defined, it would cost a Python call on every assignment.
    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"ctx.message has no attribute {name!r}: set it first (ctx.message.{name} = ...),"
            " or declare it on the app's message_state class and use ctx.message.state"
        )

    if TYPE_CHECKING:

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
        sender = self._sender
        if sender is None:
            raise NotAvailable(
                "ctx.message.sender is not known before MAIL FROM; read it from 'envfrom' on"
            )
        if isinstance(sender, bytes):
            sender = self._sender = _decoded(_MAIL, sender, EnvFrom)
        return sender

    @sender.setter
    def sender(self, value: EnvFrom | bytes | None) -> None:
        self._sender = value

    @property
    def recipients(self) -> list[EnvRcpt]:
        """The recipients accepted so far, refused ones left out: in an ``envrcpt`` handler,
        those before the one being checked."""
        recipients = self.recipient_records
        if self._undecoded_recipients:
            for at, recipient in enumerate(recipients):
                if isinstance(recipient, bytes):
                    recipients[at] = _decoded(_RCPT, recipient, EnvRcpt)
            self._undecoded_recipients = False
        # Every item is a model now: the list is handed out as it is, for handlers to edit.
        return recipients  # type: ignore[return-value]

    def record_recipient(self, payload: bytes) -> None:
        """Count in an accepted recipient kept as its RCPT payload (the server)."""
        self._undecoded_recipients = True
        self.recipient_records.append(payload)

    @property
    def begun(self) -> bool:
        """Whether the MTA has sent anything of this transaction yet."""
        return self._sender is not None or bool(self.recipient_records or self.header_events)

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
        return self.header_events

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


def _decoded(command: int, payload: bytes, kind: type[_E]) -> _E:
    """Decode the payload of a command that the server kept undecoded."""
    event = decode_command(command, payload)
    assert isinstance(event, kind)
    return event


class _BodyStream:
    """A replacement body read from a file when it is sent, then closed."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source

    def chunks(self, size: int) -> Iterator[ReplaceBody]:
        with self.source:
            for chunk in body_chunks(self.source, size):
                yield ReplaceBody(chunk=chunk)


class Context(Generic[MessageStateT, ConnectionStateT]):
    """Per-connection state handed to every handler.

    Generic in the app's state classes, message first: annotate a handler's context as
    ``Context[Scores]`` (per-message state only) or ``Context[Scores, Session]``, and mypy
    checks ``ctx.message.state`` and ``ctx.state``.

    Attributes:
        app_name: name of the App serving the connection.
        conn_id: identifier of the connection, unique in this process.
        peer: the MTA's address (``"127.0.0.1:41234"``, or the socket path for unix).
        client: the SMTP client, from the connect event (the MTA is always asked for it).
        helo: the HELO/EHLO name (None until then, or when the client sent none).
        macros: the MTA's macros, merged over stages; look up ``"i"`` or ``"{i}"`` alike.
        options: what was negotiated with the MTA (None before negotiation).
        state: this connection's own data: an instance of the app's ``connection_state``.
        message: the current mail transaction.
        log: a structlog logger bound with conn_id, peer, client and queue_id.
    """

    def __init__(
        self,
        *,
        app_name: str,
        conn_id: str,
        peer: str,
        macros: Mapping[str, str],
        spool_threshold: int | None = None,
        progress: Callable[[], Awaitable[None]] | None = None,
        log: Any = None,
        options: SessionOptions | None = None,
        raise_errors: bool = False,
        headers_kept: bool = True,
        message_state: Callable[[], Any] = dict,
        connection_state: Callable[[], Any] = dict,
    ) -> None:
        self.app_name = app_name
        self.conn_id = conn_id
        self.peer = peer
        self._client: Connect | bytes | None = None
        self._helo: str | bytes | None = None
        self.macros = macros
        self.options = options
        self._new_state = connection_state
        self._state: Any = _UNSET
        # The logger is bound when first used: most sessions log nothing, and binding costs
        # a new logger each time (twice per connection and once per message otherwise).
        self._log_base: Any = structlog.get_logger("milterapp") if log is None else log
        self._log_values: dict[str, Any] = {"conn_id": conn_id, "peer": peer}
        self._log_queue_id = False  # bind the queue id (macro i) too, from end of message on
        self._log: Any = None
        self._progress = progress
        self._modifications: list[Modification | _BodyStream] = []
        self._at_eom = False
        self._message_args = (macros, spool_threshold, headers_kept, message_state)
        self.message: Message[MessageStateT] = Message(
            macros, spool_threshold, headers_kept=headers_kept, new_state=message_state
        )
        #: Let handler exceptions escape instead of the fallback reply (the testing kit).
        self.raise_errors = raise_errors

    @property
    def client(self) -> Connect:
        """The SMTP client (the connect event).

        Raises:
            NotAvailable: read before the MTA sent it (in ``open`` or ``negotiate`` handlers).
        """
        client = self._client
        if client is None:
            raise NotAvailable(
                "ctx.client is not known before the connect event (in an 'open' or "
                "'negotiate' handler); read it from 'connect' on"
            )
        if isinstance(client, bytes):
            client = self._client = _decoded(_CONNECT, client, Connect)
        return client

    @client.setter
    def client(self, event: Connect | bytes) -> None:
        """The connect event, or its payload (decoded when first read)."""
        self._client = event
        self._log = None  # bound again, with the client, when next used

    @property
    def helo(self) -> str | None:
        """The HELO/EHLO name; None until then, or when the client sent none."""
        helo = self._helo
        if isinstance(helo, bytes):
            helo = self._helo = _decoded(_HELO, helo, Helo).name
        return helo

    @helo.setter
    def helo(self, name: str | bytes | None) -> None:
        """The HELO name, or the HELO payload (decoded when first read)."""
        self._helo = name

    @property
    def client_known(self) -> bool:
        """Whether the connect event has arrived (:attr:`client` is readable)."""
        return self._client is not None

    @property
    def state(self) -> ConnectionStateT:
        """This connection's own data: a fresh instance of the app's ``connection_state``."""
        state = self._state
        if state is _UNSET:
            state = self._state = self._new_state()
        return state  # type: ignore[no-any-return]

    @state.setter
    def state(self, value: ConnectionStateT) -> None:
        self._state = value

    def detach(self) -> None:
        """The connection is over: forget its progress callback (:meth:`progress` then does
        nothing)."""
        self._progress = None

    @property
    def log(self) -> Any:
        """A structlog logger bound with conn_id, peer, client and queue_id."""
        log = self._log
        if log is None:
            values = self._log_values
            if self._client is not None:
                client = self.client
                values = {**values, "client": str(client.address or client.hostname)}
            if self._log_queue_id and (queue_id := self.message.queue_id):
                values = {**values, "queue_id": queue_id}
            log = self._log = self._log_base.bind(**values)
        return log

    @log.setter
    def log(self, logger: Any) -> None:
        # An app's own logger (or ctx.log.bind(...)): what the server binds later goes on it.
        self._log_base = self._log = logger
        self._log_values = {}

    def bind_log(self, **values: Any) -> None:
        """Add ``values`` to what :attr:`log` is bound with."""
        self._log_values = {**self._log_values, **values}
        self._log = None

    # --- bookkeeping, called by the server ---------------------------------------------

    def new_message(self) -> None:
        """Start a fresh :class:`Message` (new MAIL, abort, end of message)."""
        self.message.close()
        macros, spool_threshold, headers_kept, new_state = self._message_args
        self.message = Message(
            macros, spool_threshold, headers_kept=headers_kept, new_state=new_state
        )
        self._modifications.clear()

    def enter_eom(self, active: bool) -> None:
        """Allow (or forbid again) modifications: they are valid during end of message only."""
        self._at_eom = active
        if active:
            self._log_queue_id = True
            self._log = None  # bound again, with the message's queue id, when next used

    def take_modifications(
        self, max_data_size: int = DEFAULT_MAX_DATA_SIZE
    ) -> Iterator[Modification]:
        """Yield the queued modifications in order, reading replacement bodies lazily."""
        queued, self._modifications = self._modifications, []
        for item in queued:
            if isinstance(item, _BodyStream):
                yield from item.chunks(max_data_size)
            else:
                yield item

    # --- modifications -----------------------------------------------------------------

    def _queue(self, modification: Modification | _BodyStream, action: ActionFlag) -> None:
        kind = (
            type(modification).__name__
            if not isinstance(modification, _BodyStream)
            else "ReplaceBody"
        )
        if not self._at_eom:
            raise LocalProtocolError(f"{kind} is only allowed in an end-of-message (eom) handler")
        # int(): IntFlag's own & runs in Python, several times slower.
        if self.options is not None and not int(self.options.actions) & int(action):
            raise ActionNotNegotiated(
                f"{kind} needs the {action.name} action, which the MTA did not grant "
                "(Postfix and Sendmail grant all actions that the App asks for)",
                action=action.name or str(action),
            )
        self._modifications.append(modification)

    def add_header(self, name: str, value: str) -> None:
        """Append a header at the end of the header block."""
        self._queue(AddHeader(name=name, value=value), ActionFlag.ADDHDRS)

    def insert_header(self, index: int, name: str, value: str) -> None:
        """Insert a header at ``index`` (0 puts it at the very top)."""
        self._queue(InsertHeader(index=index, name=name, value=value), ActionFlag.ADDHDRS)

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Change the ``index``-th header called ``name`` (1-based, as MTAs count)."""
        self._queue(ChangeHeader(name=name, value=value, index=index), ActionFlag.CHGHDRS)

    def delete_header(self, name: str, index: int = 1) -> None:
        """Delete the ``index``-th header called ``name``. To delete several occurrences,
        delete the highest index first: Postfix renumbers after each deletion."""
        self._queue(ChangeHeader(name=name, value="", index=index), ActionFlag.CHGHDRS)

    def replace_body(self, body: bytes | IO[bytes]) -> None:
        """Replace the body with bytes, or with an open binary file.

        A file is read in chunks when the reply is sent, after the handler returned, and
        closed then: hand it over open (not inside a ``with`` block that closes it first).
        """
        if isinstance(body, bytes | bytearray | memoryview):
            self._queue(ReplaceBody(chunk=bytes(body)), ActionFlag.CHGBODY)
        else:
            self._queue(_BodyStream(body), ActionFlag.CHGBODY)

    def add_recipient(self, address: str, args: str | None = None) -> None:
        """Add an envelope recipient, with ESMTP arguments if given (``"NOTIFY=NEVER"``)."""
        modification = AddRecipient(address=address, args=args)
        self._queue(modification, modification.required_action)

    def delete_recipient(self, address: str) -> None:
        """Remove an envelope recipient, given as the MTA sent it."""
        self._queue(DeleteRecipient(address=address), ActionFlag.DELRCPT)

    def change_sender(self, address: str, args: str | None = None) -> None:
        """Replace the envelope sender, with ESMTP arguments if given."""
        self._queue(ChangeSender(address=address, args=args), ActionFlag.CHGFROM)

    def quarantine(self, reason: str) -> None:
        """Hold the message in the MTA's quarantine (Postfix: the hold queue)."""
        self._queue(Quarantine(reason=reason), ActionFlag.QUARANTINE)

    async def progress(self) -> None:
        """Tell the MTA we are still working (end of message only); restarts its timer.

        The server also does this by itself while an end-of-message handler runs.
        """
        if not self._at_eom:
            raise LocalProtocolError("progress is only allowed in an end-of-message handler")
        if self._progress is not None:
            await self._progress()
