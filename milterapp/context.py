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
from typing import IO, TYPE_CHECKING, Any, Final

import structlog

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, ActionFlag
from milterapp.errors import ActionNotNegotiated, LocalProtocolError
from milterapp.events import Connect, EnvFrom, EnvRcpt, Header
from milterapp.protocol.negotiation import SessionOptions
from milterapp.protocol.responses import body_chunks
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

__all__ = ["Context", "Message"]

_READ_SIZE: Final = DEFAULT_MAX_DATA_SIZE


class Message:
    """One mail transaction: envelope, headers and (when kept) the body.

    Set your own attributes freely (``ctx.message.score = 5``); they live as long as the
    message. ``headers`` holds the headers seen so far; ``body`` is only kept when the app
    asked for whole messages (``App(keep_message=True)``).
    """

    def __init__(self, macros: Mapping[str, str], spool_threshold: int | None) -> None:
        self.sender: EnvFrom | None = None
        self.recipients: list[EnvRcpt] = []
        self.headers: list[Header] = []
        self.body_size = 0
        self._macros = macros
        self._spool_threshold = spool_threshold
        self._body: IO[bytes] | None = None

    # Own attributes are part of the API (ctx.message.score = 5): __getattr__ makes a typo a
    # clear error, and with __setattr__ tells type checkers so. __setattr__ is declared for
    # them only: defined, it would cost a Python call on every assignment.
    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"ctx.message has no attribute {name!r}: set it first (ctx.message.{name} = ...)"
        )

    if TYPE_CHECKING:

        def __setattr__(self, name: str, value: Any) -> None: ...

    @property
    def queue_id(self) -> str | None:
        """The MTA's queue id (macro ``i``) once the MTA has sent it."""
        return self._macros.get("i")

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
            LookupError: the app does not keep whole messages.
        """
        if self._spool_threshold is None:
            raise LookupError("the body is not kept: create the App with keep_message=True")
        if self._body is None:
            return io.BytesIO()
        self._body.seek(0)
        return self._body

    def body_bytes(self) -> bytes:
        """Return the whole body in memory (mind large messages: prefer :meth:`body`)."""
        return self.body().read()

    def as_email(self) -> EmailMessage:
        """Parse the headers seen and the kept body into a standard-library EmailMessage."""
        feeder = email.parser.BytesFeedParser(policy=email.policy.default)
        for header in self.headers:
            # Without HDR_LEADSPC the MTA removed the space after the colon: put it back.
            separator = b":" if header.leading_space else b": "
            feeder.feed(header.raw_name + separator + header.raw_value + b"\n")
        feeder.feed(b"\n")
        if self.body_kept:
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


class _BodyStream:
    """A replacement body read from a file when it is sent, then closed."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source

    def chunks(self, size: int) -> Iterator[ReplaceBody]:
        with self.source:
            for chunk in body_chunks(self.source, size):
                yield ReplaceBody(chunk=chunk)


class Context:
    """Per-connection state handed to every handler.

    Attributes:
        app_name: name of the App serving the connection.
        conn_id: identifier of the connection, unique in this process.
        peer: the MTA's address (``"127.0.0.1:41234"``, or the socket path for unix).
        client: the SMTP client, from the connect event (None until then, or if not sent).
        helo: the HELO/EHLO name (None until then, or if not sent).
        macros: the MTA's macros, merged over stages; look up ``"i"`` or ``"{i}"`` alike.
        options: what was negotiated with the MTA (None before negotiation).
        state: a dict for your own per-connection data.
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
    ) -> None:
        self.app_name = app_name
        self.conn_id = conn_id
        self.peer = peer
        self.client: Connect | None = None
        self.helo: str | None = None
        self.macros = macros
        self.options = options
        self.state: dict[str, Any] = {}
        # The logger is bound when first used: most sessions log nothing, and binding costs
        # a new logger each time (twice per connection and once per message otherwise).
        self._log_base: Any = structlog.get_logger("milterapp") if log is None else log
        self._log_values: dict[str, Any] = {"conn_id": conn_id, "peer": peer}
        self._log_queue_id = False  # bind the queue id (macro i) too, from end of message on
        self._log: Any = None
        self._spool_threshold = spool_threshold
        self._progress = progress
        self._modifications: list[Modification | _BodyStream] = []
        self._at_eom = False
        self.message = Message(macros, spool_threshold)
        #: Let handler exceptions escape instead of the fallback reply (the testing kit).
        self.raise_errors = raise_errors

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
        self.message = Message(self.macros, self._spool_threshold)
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
