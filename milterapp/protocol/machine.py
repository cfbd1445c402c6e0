"""The milter side of one MTA connection, as a sans-IO state machine.

Theory of operation
-------------------
Feed the bytes read from the MTA to :meth:`MilterConnection.receive_data` (``b""`` at end of
file) and call :meth:`~MilterConnection.next_event` until it returns None. When an event
needs an answer (:attr:`~MilterConnection.awaiting_reply`), pass the reply to
:meth:`~MilterConnection.send`, which returns the bytes to write. No further event is handed
out until that answer is given: the MTA never sends a command that needs a reply before it
has the previous one, so holding back keeps the state exact.

The machine tracks two levels (protocol reference §7):

* the connection: negotiating, waiting for CONNECT, in session, done (a connection-level
  verdict was given), closed;
* the message: open from MAIL (or the first message command when MAIL is suppressed) until
  its verdict or an abort, with the rank of the last command, so that commands can only move
  forward (RCPT, headers and body chunks may repeat).

It synthesises an :class:`~milterapp.events.Abort` when a message ends without a verdict
(HELO, MAIL, QUIT or end of file inside a message), and swallows the aborts Postfix sends
when no message is open. Everything the MTA sends out of order or malformed raises
:class:`RemoteProtocolError` and leaves the machine in the ``ERROR`` state for good.
Everything we are asked to send at the wrong time raises :class:`LocalProtocolError` and
changes nothing, so the caller can send a fallback reply instead.

Receiving and sending are one class: the two halves share all their state, and the reply
rules that need no state are pure functions in :mod:`milterapp.protocol.answers`. At about
500 lines it is the largest class of the core, on purpose: it is the core.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Final

from milterapp.constants import ALL_COMMANDS, ActionFlag, ConnectionState
from milterapp.errors import (
    LimitExceededError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from milterapp.events import Abort, ConnectionClosed, Event, Macros, Negotiate, Unparsed
from milterapp.protocol.answers import check_modification, check_verdict, require_end_of_message
from milterapp.protocol.codec import decode_command, encode_response
from milterapp.protocol.commands import decode_macros
from milterapp.protocol.framing import FrameDecoder
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.negotiation import SessionOptions, session_options
from milterapp.protocol.stages import BY_COMMAND, MESSAGE_STAGES, SEQUENCE
from milterapp.replies import (
    Continue,
    NegotiationReply,
    Progress,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
)

__all__ = ["UNPARSED", "MilterConnection"]

_O, _D, _C, _H, _M, _R, _T, _L, _N, _B, _E, _U, _A, _Q, _K = ALL_COMMANDS

# Rank of each message command in the sequence of stages; a command may follow one of lower
# rank, or its own if it repeats.
_RANK: Final = {
    stage.commands[0]: SEQUENCE.index(stage.commands.decode()) for stage in MESSAGE_STAGES
}
_REPEATS: Final = frozenset(command for command, stage in BY_COMMAND.items() if stage.repeats)
# Message commands that go on with an open message (the first, MAIL, starts a new one).
_FORWARD: Final = {stage.commands[0]: _RANK[stage.commands[0]] for stage in MESSAGE_STAGES[1:]}
# By command: what a verdict ends (the connection or the message), and the verdicts that
# end nothing.
_SCOPE: Final = {command: stage.scope for command, stage in BY_COMMAND.items() if stage.scope}
_GOES_ON: Final = {command: stage.goes_on for command, stage in BY_COMMAND.items()}
_CONTINUE_PACKET: Final = encode_response(Continue())
_NOTHING: Final[frozenset[int]] = frozenset()
_PLAIN_STAGES: Final = frozenset(range(1, 256)) - {_M}
_ANY_SIZE: Final = 1 << 62

#: The one :class:`~milterapp.events.Unparsed` event there is: handing it out allocates
#: nothing (the model lives in an interpreted module: mypyc compiles no pydantic models).
UNPARSED: Final = Unparsed()
# The states as module constants: compiled, these are read once, where naming a member of
# an enum of another module is an attribute lookup every time.
_NEGOTIATING: Final = ConnectionState.NEGOTIATING
_CONNECTING: Final = ConnectionState.CONNECTING
_SESSION: Final = ConnectionState.SESSION
_MESSAGE: Final = ConnectionState.MESSAGE
_DONE: Final = ConnectionState.DONE
_CLOSED: Final = ConnectionState.CLOSED
_ERROR: Final = ConnectionState.ERROR
_NO_ACTION: Final = ActionFlag.NONE


class MilterConnection:
    """Sans-IO state machine for the milter side of one MTA connection.

    Args:
        max_data_size: largest incoming payload to accept. None (the default) means the
            negotiated maximum (64 KiB unless the MTA offered more and we accepted).
        macro_events: hand out a :class:`Macros` event for each ``D`` packet. When False,
            macros only go into :attr:`macros` (the server's way: no model per packet).
        max_macros_per_packet: most name/value pairs in one ``D`` packet (0: no limit);
            more raises :class:`~milterapp.errors.LimitExceededError`.
        undecoded: command bytes that the caller only keeps, not decoded into a model (a
            model costs several times what the rest of a packet's path does). One that needs
            no reply goes into :attr:`kept` without an event; one that needs a reply is
            handed out as :data:`UNPARSED`, its payload in :attr:`unparsed`. Their payload is
            not checked here: whoever decodes it later finds any fault.

    Attributes:
        kept: the undecoded commands that needed no reply, in order, since the caller last
            emptied the list (do so before handling the next event).
        unparsed: the command byte and payload of the last :data:`UNPARSED` handed out.
    """

    def __init__(
        self,
        *,
        max_data_size: int | None = None,
        macro_events: bool = True,
        max_macros_per_packet: int = 0,
        undecoded: frozenset[int] = _NOTHING,
    ) -> None:
        self._limit = max_data_size
        self._undecoded = undecoded
        self.kept: list[tuple[int, bytes]] = []
        self.unparsed: tuple[int, bytes] = (0, b"")
        self._macro_events = macro_events
        self._max_macros = max_macros_per_packet
        # What the per-packet path takes a D packet as plainly fine by: its stage letter
        # (none before negotiation; MAIL's may end a message) and its size (so short that
        # its NULs cannot hold more macros than the limit).
        self._plain_stages: frozenset[int] = _NOTHING
        self._plain_size = 2 * max_macros_per_packet + 1 if max_macros_per_packet else _ANY_SIZE
        self._frames = FrameDecoder() if max_data_size is None else FrameDecoder(max_data_size)
        # Whole packets taken from the decoder and not yet handled: taken all at once, they
        # cost one call per read instead of one per packet.
        self._batch: Iterator[tuple[int, bytes]] = iter(())
        # Events decoded but not yet handed out, each with the command byte it makes us owe a
        # reply to (None for synthesised aborts and commands that need no reply).
        self._ready: deque[tuple[Event, int | None]] = deque()
        self._pending: int | None = None  # command byte awaiting our reply
        self._eof = False
        self._body_replaced = False  # a ReplaceBody was sent during this end of message
        self._body_closed = False  # ...and something else was sent after it
        self.state = _NEGOTIATING
        self.offer: Negotiate | None = None
        self.options: SessionOptions | None = None
        self.macros = MacroTable()
        self.rank = -1  # rank of the last message command while a message is open
        self.skipped = False  # Skip was sent for this message's body
        # Derived from the options, kept as plain values for the per-packet path.
        self._expects: frozenset[int] = frozenset({_O})
        self._leading_space = False
        #: When :meth:`next_event` last ran out of data: whether a packet had begun (and the
        #: rest is awaited). Cheaper to read than :attr:`buffered`, for the per-read path.
        self.partial = False

    # --- receiving ---------------------------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        """True while the last event handed out waits for :meth:`send`."""
        return self._pending is not None

    @property
    def pending_command(self) -> str | None:
        """Letter of the command waiting for a reply, if any."""
        return None if self._pending is None else chr(self._pending)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet cut into packets: after the events ran out, a command
        still arriving (packets cut but not yet handled are not counted)."""
        return self._frames.buffered

    def release(self) -> None:
        """The memoryview last given to :meth:`receive_data` is about to change: keep a
        copy of what is left of it."""
        self._frames.release()

    def read_target(self) -> memoryview | None:
        """Where to read the rest of a large packet that has begun, if one has.

        Reading straight into it spares a copy of a body chunk that spans reads. Read at
        most ``len()`` bytes into it, then call :meth:`target_filled`; or ignore it and pass
        the bytes to :meth:`receive_data` as usual.
        """
        return self._frames.read_target()

    def target_filled(self, size: int) -> None:
        """``size`` bytes were read into the view :meth:`read_target` gave."""
        if self._eof:
            raise LocalProtocolError("target_filled() called after end of file")
        self._frames.target_filled(size)

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes read from the MTA; ``b""`` means the MTA closed the connection.

        A memoryview is read in place until :meth:`release` (or until everything in it has
        been handed out as events).
        """
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data() called with data after end of file")
            self._frames.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """Return the next event, or None when more data (or a reply) is needed first.

        Raises:
            RemoteProtocolError: the MTA sent a malformed or out-of-order command.
        """
        if self._pending is not None:
            return None
        if self._ready:
            return self._hand_out()
        state = self.state
        if state is _CLOSED:
            return None
        if state is _ERROR:
            raise RemoteProtocolError("the connection already failed with a protocol error")
        # The per-packet path: everything for the usual packets is in this one loop.
        frames = self._frames
        batch = self._batch
        try:
            while True:
                # A for loop over the batch's iterator: each step is the cheapest there is,
                # and a return inside it leaves the rest of the batch for the next call.
                for command, payload in batch:
                    if command == _D and not self._macro_events:
                        # _define_macro_packet() in place for the usual packet (seven or
                        # more per message): a stage that needs nothing more, NUL-terminated
                        # pairs, and too short to hold more macros than the limit.
                        if (
                            payload
                            and payload[0] in self._plain_stages
                            and payload[-1] == 0
                            and not payload.count(0) & 1
                            and len(payload) <= self._plain_size
                        ):
                            self.macros.define_packet(chr(payload[0]), payload)
                        else:
                            self._define_macro_packet(payload)  # the general rules
                        continue
                    if command in self._undecoded:
                        event: Event = UNPARSED  # (payloads are copies: kept beyond this read)
                    else:
                        event = decode_command(command, payload, leading_space=self._leading_space)
                    # Most commands move an open message forward (RCPT, headers, body...): that
                    # case is checked here in full; every other goes through _advance.
                    rank = _FORWARD.get(command) if self.state is _MESSAGE else None
                    if rank is not None and (
                        rank > self.rank or (rank == self.rank and command in _REPEATS)
                    ):
                        if command == _R:
                            if rank != self.rank:  # (a further RCPT finds no later stage)
                                self.macros.enter("R")
                        elif command == _B and self.skipped:
                            raise self._fail(command, "body chunk after Skip")
                        self.rank = rank
                    elif not self._advance(command, event):
                        continue
                    pending = command if command in self._expects else None
                    if event is UNPARSED:
                        if pending is None and not self._ready:
                            self.kept.append((command, payload))
                            continue
                        self.unparsed = (command, payload)
                    if self._ready:  # synthesised aborts go first
                        self._ready.append((event, pending))
                        return self._hand_out()
                    self._pending = pending
                    return event
                # The batch is done: take the next one, if a packet is whole.
                if frames.empty and not self._eof:  # the usual end of a read
                    self.partial = False
                    return None
                taken = frames.take_frames()
                if taken:
                    batch = self._batch = iter(taken)
                    continue
                if self._eof:
                    frames.check_eof()
                    return self._close(ConnectionClosed())
                self.partial = frames.partial
                return None
        except ProtocolError:
            self.state = _ERROR
            raise

    def _hand_out(self) -> Event:
        event, self._pending = self._ready.popleft()
        return event

    def _fail(self, command: int, message: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"{message} (state {self.state.value})", command=chr(command))

    def _close(self, event: Event) -> Event:
        self._quit()
        self._ready.append((event, None))
        return self._hand_out()

    def _advance(self, command: int, event: Event) -> bool:
        """Move the state on for ``command``; return False to swallow its event."""
        state = self.state
        if state is _NEGOTIATING:
            if command != _O or self.offer is not None:
                raise self._fail(command, "expected option negotiation first")
            assert isinstance(event, Negotiate)
            self.offer = event
        elif command == _O:
            raise self._fail(command, "option negotiation happens once per connection")
        elif command == _D:
            assert isinstance(event, Macros)
            self._define_macros(event.stage, event.values)
        elif command == _Q:
            self._quit()
        elif command == _K:
            self._abort_open_message()
            self.macros.clear()
            self.state = _CONNECTING
        elif command == _A:
            # Postfix sends A after every message and on RSET: only an open message aborts.
            if state is not _MESSAGE:
                return False
            self._end_message()
        elif state is _DONE:
            raise self._fail(command, "command after a connection-level verdict")
        elif command == _C:
            if state is not _CONNECTING:
                raise self._fail(command, "CONNECT after the connection was established")
            self.macros.enter("C")
            self.state = _SESSION
        elif command == _U:
            pass
        elif command == _H:
            self._require_connected(command)
            self._abort_open_message()
            self.macros.enter("H")
            self.state = _SESSION
        else:
            self._advance_message(command)
        return True

    def _define_macros(self, stage: str, values: dict[str, str]) -> None:
        self._check_macros(stage, len(values))
        self.macros.define(stage, values)

    def _define_macro_packet(self, payload: bytes) -> None:
        """Keep a ``D`` packet for the macro table to decode if the app looks a macro up
        (most apps never do): here its shape is only checked, which is much cheaper."""
        nuls = payload.count(0)
        if not payload or not payload[0] or nuls % 2 or (len(payload) > 1 and payload[-1]):
            decode_macros(payload)  # not the usual shape: raises, saying what is wrong
        stage = chr(payload[0])
        self._check_macros(stage, nuls // 2)
        self.macros.define_packet(stage, payload)

    def _check_macros(self, stage: str, count: int) -> None:
        if self.state is _NEGOTIATING:
            raise self._fail(_D, "expected option negotiation first")
        limit = self._max_macros
        if limit and count > limit:
            raise LimitExceededError(
                f"{count} macros in one packet, above the limit of {limit}",
                limit="max_macros_per_packet",
                value=limit,
                count=count,
                command="D",
            )
        if stage == "M":
            # A new transaction's MAIL macros while a message is open: the old message
            # ended without an abort. End it now, so its abort comes before these macros.
            self._abort_open_message()

    def _quit(self) -> None:
        if self.state is _MESSAGE:
            self._ready.append((Abort(), None))
        self.state = _CLOSED
        self.macros.clear()

    def _abort_open_message(self) -> None:
        """End an open message that the MTA left without an abort, and say so with one."""
        if self.state is _MESSAGE:
            self._ready.append((Abort(), None))
            self._end_message()

    def _end_message(self) -> None:
        self.state = _SESSION
        self.macros.reset_message()

    def _require_connected(self, command: int) -> None:
        options = self.options
        if self.state is _CONNECTING and options is not None and not options.suppressed("connect"):
            raise self._fail(command, "expected CONNECT first")

    def _advance_message(self, command: int) -> None:
        rank = _RANK[command]
        if command == _M:
            self._require_connected(command)
            if self.state is _MESSAGE:
                # Keep the MAIL macros just defined: opening the message drops later stages.
                self._ready.append((Abort(), None))
            self._open_message(command)
            return
        if self.state is not _MESSAGE:
            self._require_connected(command)
            if not self._may_open_with(command):
                raise self._fail(command, "message command outside a message")
            self._open_message(command)
            return
        if rank < self.rank or (rank == self.rank and command not in _REPEATS):
            raise self._fail(command, f"out of order after {SEQUENCE[self.rank]!r}")
        if command == _B and self.skipped:
            raise self._fail(command, "body chunk after Skip")
        self.rank = rank
        if command in (_R, _M):
            self.macros.enter(chr(command))

    def _may_open_with(self, command: int) -> bool:
        # A message starts with MAIL, unless the MTA was asked not to send it (and RCPT).
        options = self.options
        assert options is not None
        if not options.suppressed("envfrom"):
            return False
        return command == _R or options.suppressed("envrcpt")

    def _open_message(self, command: int) -> None:
        self.state = _MESSAGE
        self.rank = _RANK[command]
        self.skipped = False
        self._body_replaced = self._body_closed = False
        self.macros.enter(chr(command))

    # --- sending -----------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Check ``reply`` against the protocol and return the bytes to write.

        Modifications and Progress may precede the verdict at end of message; every other
        reply answers the pending command.

        Raises:
            LocalProtocolError: no command waits for this reply, or it is not allowed now.
            ActionNotNegotiated: a modification whose action the MTA did not grant.
        """
        command = self._pending
        if command is None:
            raise LocalProtocolError(
                f"{type(reply).__name__} sent while no command waits for a reply "
                f"(state {self.state.value})"
            )
        if isinstance(reply, NegotiationReply):
            return self._send_negotiation(command, reply)
        options = self.options
        if command == _O or options is None:
            raise LocalProtocolError(
                f"{type(reply).__name__} sent in answer to option negotiation; "
                "send a NegotiationReply",
                command="O",
            )
        if isinstance(reply, Progress):
            require_end_of_message(command, reply)
            if self._body_replaced:  # Postfix ends body replacement at any other packet
                self._body_closed = True
            return encode_response(reply)
        if reply.required_action is not _NO_ACTION:
            self._check_modification(command, reply, options)
            return encode_response(reply, max_data_size=options.max_data_size)
        check_verdict(command, reply, options)
        self._pending = None
        self._after_verdict(command, reply)
        return encode_response(reply)

    def send_continue(self) -> bytes:
        """``send(Continue())``, without the checks only other replies need.

        Continue is a valid answer to every command that expects one, and only at end of
        message (where it ends the message) does it change more than the pending command.
        """
        if self._pending is None:
            return self.send(Continue())  # raises: nothing to answer
        return self.continue_if_owed()

    def continue_if_owed(self) -> bytes:
        """:meth:`send_continue` if a reply is owed, else nothing (``b""``)."""
        command = self._pending
        if command is None:
            return b""
        if command in (_O, _E) or self.options is None:
            return self.send(Continue())  # raises, or ends the message
        self._pending = None
        return _CONTINUE_PACKET

    def _send_negotiation(self, command: int, reply: NegotiationReply) -> bytes:
        if command != _O:
            raise LocalProtocolError(
                f"negotiation reply sent in answer to {chr(command)!r}", command="O"
            )
        offer = self.offer
        assert offer is not None
        options = session_options(offer, reply)
        self._expects = options.replied_commands
        self.options = options
        self._leading_space = options.leading_space
        self._plain_stages = _PLAIN_STAGES
        if self._limit is None:
            self._frames.max_data_size = options.max_data_size
        self._pending = None
        self.state = _CONNECTING
        return encode_response(reply)

    def _check_modification(self, command: int, reply: Reply, options: SessionOptions) -> None:
        check_modification(command, reply, options)
        # Postfix fails the milter when anything comes between replacement body packets.
        if isinstance(reply, ReplaceBody):
            if self._body_closed:
                raise LocalProtocolError(
                    "ReplaceBody packets must be sent together, with nothing in between",
                    command="b",
                )
            self._body_replaced = True
        elif self._body_replaced:
            self._body_closed = True

    def _after_verdict(self, command: int, reply: Reply) -> None:
        if isinstance(reply, Shutdown):
            self.state = _DONE
            return
        scope = _SCOPE.get(command)
        if scope == "connection":
            if not isinstance(reply, _GOES_ON[command]):
                self.state = _DONE
        elif scope == "message" and self.state is _MESSAGE:
            if isinstance(reply, Skip):
                self.skipped = True
            elif not isinstance(reply, _GOES_ON[command]):
                self.state = _SESSION
