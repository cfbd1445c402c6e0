"""The sending half of :class:`~milterapp.protocol.machine.MilterConnection`: replies.

:class:`Replying` checks each reply against the protocol and what was negotiated, encodes it,
and moves the connection's state on after a verdict. It also holds what both halves share:
:class:`ConnectionState` and the command bytes.
"""

from __future__ import annotations

import enum
from typing import Final

from milterapp.errors import LocalProtocolError
from milterapp.events import Negotiate
from milterapp.protocol.answers import (
    check_modification,
    check_verdict,
    refuses_one_recipient,
    require_end_of_message,
)
from milterapp.protocol.codec import encode_response
from milterapp.protocol.constants import ActionFlag
from milterapp.protocol.framing import FrameDecoder
from milterapp.protocol.negotiation import SessionOptions, session_options
from milterapp.replies import (
    Continue,
    NegotiationReply,
    Progress,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
)

__all__ = ["ALL_COMMANDS", "ConnectionState", "Replying"]


class ConnectionState(enum.Enum):
    """Where a connection stands."""

    NEGOTIATING = "negotiating"  # waiting for the MTA's O, or our answer to it
    CONNECTING = "connecting"  # negotiated; CONNECT (or what follows it) comes next
    SESSION = "session"  # connected; no message open
    MESSAGE = "message"  # a message is open
    DONE = "done"  # a connection-level verdict was given; only quit/abort/macros follow
    CLOSED = "closed"  # quit or end of file
    ERROR = "error"  # the MTA broke the protocol


#: Every command byte the MTA sends, in the order of the names below.
ALL_COMMANDS: Final = tuple(ord(c) for c in "ODCHMRTLNBEUAQK")
_O, _D, _C, _H, _M, _R, _T, _L, _N, _B, _E, _U, _A, _Q, _K = ALL_COMMANDS

_CONTINUE_PACKET: Final = encode_response(Continue())
#: Negotiated options (and the commands that expect a reply) by offer and reply.
_SESSIONS: dict[tuple[int, ...], tuple[SessionOptions, frozenset[int]]] = {}
_SESSIONS_KEPT: Final = 64


class Replying:
    """Replies to the MTA: the sending half of a
    :class:`~milterapp.protocol.machine.MilterConnection` (a mixin; the state is that
    class's)."""

    # The connection's state, set up by MilterConnection.__init__.
    state: ConnectionState
    offer: Negotiate | None
    options: SessionOptions | None
    skipped: bool
    _pending: int | None
    _expects: frozenset[int]
    _leading_space: bool
    _limit: int | None
    _frames: FrameDecoder
    _body_replaced: bool
    _body_closed: bool

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
        if reply.required_action is not ActionFlag.NONE:
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
        # Every connection from one MTA negotiates alike: compute the options once.
        key = (
            offer.version,
            int(offer.actions),
            int(offer.protocol),
            reply.version,
            int(reply.actions),
            int(reply.protocol),
        )
        known = _SESSIONS.get(key)
        if known is None:
            options = session_options(offer, reply)
            expects = frozenset(c for c in ALL_COMMANDS if options.reply_expected(c))
            if len(_SESSIONS) >= _SESSIONS_KEPT:
                _SESSIONS.clear()
            known = _SESSIONS[key] = (options, expects)
        options, self._expects = known
        self.options = options
        self._leading_space = options.leading_space
        if self._limit is None:
            self._frames.max_data_size = options.max_data_size
        self._pending = None
        self.state = ConnectionState.CONNECTING
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
            self.state = ConnectionState.DONE
        elif command in (_C, _H):
            if not isinstance(reply, Continue):
                self.state = ConnectionState.DONE
        elif command == _U or self.state is not ConnectionState.MESSAGE:
            return
        elif isinstance(reply, Skip):
            self.skipped = True
        elif command == _E or not isinstance(reply, Continue):
            if command == _R and refuses_one_recipient(reply):
                return  # only this recipient is refused; the message goes on
            self.state = ConnectionState.SESSION
