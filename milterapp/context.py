"""What a handler knows about its connection and message, and how it asks for changes.

One :class:`Context` per MTA connection (one SMTP session); one :class:`Message` per mail
transaction inside it, replaced at each new message and at abort. Modifications are queued
on the context at end of message and sent by the server before the verdict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import IO, Any, Final, Generic

import structlog
from typing_extensions import TypeVar

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, ActionFlag, Command
from milterapp.errors import ActionNotNegotiated, LocalProtocolError, NotAvailable
from milterapp.events import Connect, Helo
from milterapp.message import KEPT_EVENTS, RECORDED_EVENTS, Message, MessageStateT, decoded
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

# Message and the event sets are defined beside the message, and named here too: a handler's
# whole world is `from milterapp.context import Context, Message`.
__all__ = ["KEPT_EVENTS", "RECORDED_EVENTS", "Context", "Message"]

_CONNECT, _HELO = (ord(command.value) for command in (Command.CONNECT, Command.HELO))
_UNSET: Final = object()

#: The type of ``ctx.state``: the app's ``connection_state`` class (a dict by default).
ConnectionStateT = TypeVar("ConnectionStateT", default=dict[str, Any])


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
        self._session_log: Any = None  # ...bound without the message's queue id
        #: Told the kind of each handler failure (``raised``, ``timed_out``, ``bad_reply``)
        #: by the App, when the server counts them (``--metrics``).
        self.count_failure: Callable[[str], None] | None = None
        #: Told each upstream milter's failure (its name, the failure's kind), likewise.
        self.count_upstream_failure: Callable[[str, str], None] | None = None
        #: The connection's chain of upstream milters (:mod:`milterapp.chain`), when the app
        #: has any: made at negotiation, carried to the next session of a reused connection.
        self.upstreams: Any = None
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
            client = self._client = decoded(_CONNECT, client, Connect)
        return client

    @client.setter
    def client(self, event: Connect | bytes) -> None:
        """The connect event, or its payload (decoded when first read)."""
        self._client = event
        self._log = self._session_log = None  # bound again, with the client, when next used

    @property
    def helo(self) -> str | None:
        """The HELO/EHLO name; None until then, or when the client sent none."""
        helo = self._helo
        if isinstance(helo, bytes):
            helo = self._helo = decoded(_HELO, helo, Helo).name
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
            log = self.session_log
            if self._log_queue_id and (queue_id := self.message.queue_id):
                log = log.bind(queue_id=queue_id)
            self._log = log
        return log

    @log.setter
    def log(self, logger: Any) -> None:
        # An app's own logger (or ctx.log.bind(...)): what the server binds later goes on it.
        self._log_base = self._log = self._session_log = logger
        self._log_values = {}

    @property
    def session_log(self) -> Any:
        """:attr:`log` without the message's queue id: kept from one message to the next
        (the server's line per message gives the queue id itself)."""
        log = self._session_log
        if log is None:
            values = self._log_values
            if self._client is not None:
                client = self.client
                values = {**values, "client": str(client.address or client.hostname)}
            log = self._session_log = self._log_base.bind(**values)
        return log

    def bind_log(self, **values: Any) -> None:
        """Add ``values`` to what :attr:`log` is bound with."""
        self._log_values = {**self._log_values, **values}
        self._log = self._session_log = None

    # --- bookkeeping, called by the server ---------------------------------------------

    def new_message(self) -> None:
        """Start a fresh :class:`Message` (new MAIL, abort, end of message)."""
        self.message.close()
        macros, spool_threshold, headers_kept, new_state = self._message_args
        self.message = Message(
            macros, spool_threshold, headers_kept=headers_kept, new_state=new_state
        )
        self._modifications.clear()
        if self._log_queue_id:  # the last message's queue id is not this one's
            self._log_queue_id = False
            self._log = None

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

    def queue(self, modification: Modification) -> None:
        """Queue a modification made as a model (an upstream milter's, for one), checked
        as those of the methods below are."""
        self._queue(modification, modification.required_action)

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
