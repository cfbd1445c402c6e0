"""The MTA side of one milter connection, as a sans-IO state machine.

Theory of operation
-------------------
:class:`MtaConnection` plays Postfix or Sendmail against a milter, as
:class:`~milterapp.protocol.machine.MilterConnection` plays the milter, without I/O:
:meth:`~MtaConnection.send` checks a command and returns its bytes; bytes read from the milter
go to :meth:`~MtaConnection.receive_data` and come back as replies from
:meth:`~MtaConnection.next_reply`, or as one :class:`Answer` per command from
:meth:`~MtaConnection.collect_answer`.

Sending (protocol reference §2, §3, §7): the offer first and once; nothing while a reply is
owed; macros at any time. Refused with :class:`LocalProtocolError`, changing nothing: commands
the milter asked not to receive (a NO flag, or a version too old for them), message commands
after the message's verdict (until ``MAIL``, ``ABORT`` or the ``D`` for ``MAIL``), and all but
``ABORT``, macros and quits after a connection-level verdict. ``force=True`` skips the checks so
that tests can feed a milter illegal input; the state still follows and owed replies queue up.

Receiving (§4, §7): each reply is checked against the oldest command owing one, as both MTAs
check it. A reply when none is owed, a negotiation reply beyond the offer, a modification or
``Progress`` outside end of message, ``Skip`` outside a body chunk or a verdict the stage does
not allow is a :class:`RemoteProtocolError`, and the connection stays failed (both MTAs drop
the milter). The final reply ends the wait and moves the state on by the verdict table of §7.
Milter packets may be big (Postfix reads up to ``INT_MAX/2`` bytes): the limit is 1 GiB.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final, NamedTuple, cast

from milterapp.constants import ALL_COMMANDS, ActionFlag, ProtocolFlag, ResponseCode
from milterapp.errors import LocalProtocolError, RemoteProtocolError
from milterapp.events import Body, Event, Macros, Negotiate
from milterapp.protocol.answers import LEGAL_REPLIES
from milterapp.protocol.codec import decode_response, encode_command
from milterapp.protocol.framing import FrameDecoder, encode_frame
from milterapp.protocol.negotiation import UNNEGOTIATED, SessionOptions, session_options
from milterapp.protocol.stages import BY_COMMAND, MESSAGE_STAGES, STAGES, OptionalEvent, Stage
from milterapp.replies import (
    Continue,
    Modification,
    NegotiationReply,
    Progress,
    Reply,
    Shutdown,
    Skip,
    Verdict,
)

__all__ = ["DEFAULT_OFFER", "MAX_REPLY_DATA_SIZE", "Answer", "MtaConnection"]

#: What Postfix >= 2.6 (milter_protocol = 6) and Sendmail 8.14+ offer.
DEFAULT_OFFER: Final = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)
#: Largest milter packet payload accepted by default (Postfix: INT_MAX/2, about 1 GiB).
MAX_REPLY_DATA_SIZE: Final = 1 << 30

_O, _D, _C, _H, _M, _R, _T, _L, _N, _B, _E, _U, _A, _Q, _K = ALL_COMMANDS

#: The optional stages by command byte (a NO flag can ask the MTA not to send them).
_CONTINUE_CODE: Final = ord(ResponseCode.CONTINUE.value)
_CONTINUE: Final = Continue()
#: The commands Continue answers without ending anything (not the offer or end of message).
_GOES_ON: Final = frozenset(ALL_COMMANDS) - {_O, _E}
#: The event class name of each command (in messages about a packet sent as bytes).
_EVENT_NAMES: Final[dict[int, str]] = {
    event.command[0]: event.__name__
    for stage in STAGES
    for event in stage.events
    if len(event.command) == 1
} | {Macros.command[0]: Macros.__name__}
_OPTIONAL: Final[dict[int, Stage]] = {
    command: stage for command, stage in BY_COMMAND.items() if stage.optional
}
#: Commands of an open message (the first message stage, MAIL, starts a new one).
_MESSAGE_COMMANDS: Final = frozenset(stage.commands[0] for stage in MESSAGE_STAGES[1:])
#: What may still be sent after a connection-level verdict: macros, and the commands that
#: get no reply (abort and the quits).
_AFTER_CONNECTION_VERDICT: Final = frozenset(
    command for command, stage in BY_COMMAND.items() if not stage.replies
) | {_D}


class Answer(NamedTuple):
    """Everything the milter sent in answer to one command, in order.

    ``verdict`` is the final reply; None for the answer to the offer, whose
    :class:`~milterapp.replies.NegotiationReply` is :attr:`MtaConnection.reply`.
    """

    modifications: list[Modification]
    progress: int
    verdict: Verdict | Shutdown | None


def _command_of(command: str | bytes | Event | type[Event]) -> int:
    letter = command.encode() if isinstance(command, str) else command
    if not isinstance(letter, bytes):
        letter = letter.command
    if len(letter) != 1:
        raise ValueError(f"{command!r} names no command")
    return letter[0]


class MtaConnection:
    """Sans-IO state machine for the MTA side of one milter connection.

    Args:
        offer: the negotiation to send first (Postfix's and Sendmail's by default).
        max_data_size: largest payload accepted in a milter packet.
    """

    def __init__(
        self, offer: Negotiate = DEFAULT_OFFER, *, max_data_size: int = MAX_REPLY_DATA_SIZE
    ) -> None:
        self.offer = offer
        self._frames = FrameDecoder(max_data_size)
        self._owed: deque[int] = deque()  # commands owing a reply, oldest first
        self._options: SessionOptions | None = None
        #: The commands the milter declined (known once negotiated; asked per packet).
        self._suppressed_commands: frozenset[int] = frozenset()
        self._reply: NegotiationReply | None = None
        self._offered = False
        self._eof = False
        self._failed = False
        self._closed = False  # QUIT was sent
        self._connection_done = False  # a connection-level verdict was received
        self._message_over = False  # the open message got its verdict
        self._skipped = False  # Skip was received for this message's body
        self._modifications: list[Modification] = []
        self._progress = 0

    # --- state -------------------------------------------------------------------------

    @property
    def options(self) -> SessionOptions | None:
        """What was negotiated; None until the milter answered the offer."""
        return self._options

    @property
    def reply(self) -> NegotiationReply | None:
        """The milter's negotiation reply; None until it arrived."""
        return self._reply

    @property
    def awaiting_reply(self) -> bool:
        """True while a command sent still waits for its final reply."""
        return bool(self._owed)

    @property
    def pending_command(self) -> str | None:
        """Letter of the oldest command waiting for a reply, if any."""
        return chr(self._owed[0]) if self._owed else None

    def expects_reply(self, command: str | bytes | Event | type[Event]) -> bool:
        """Whether the milter answers ``command`` (a letter, an event or an event class).

        Before negotiation every command but macros, abort and the quits expects one.
        """
        return (self._options or UNNEGOTIATED).reply_expected(_command_of(command))

    @property
    def declined_commands(self) -> frozenset[int]:
        """The command bytes the milter asked not to receive (or its version lacks)."""
        return self._suppressed_commands

    def suppressed(self, command: str | bytes | Event | type[Event]) -> bool:
        """Whether the milter asked not to receive ``command`` (or its version lacks it)."""
        return self._suppression(_command_of(command)) is not None

    def _suppression(self, command: int) -> str | None:
        if command not in self._suppressed_commands:
            return None
        stage = _OPTIONAL.get(command)
        options = self._options
        if stage is None or options is None:
            return None
        if options.protocol & stage.suppress:
            return f"the milter negotiated {stage.suppress.name}"
        if options.suppressed(cast(OptionalEvent, stage.name)):
            return f"protocol version {options.version} has no {stage.name!r} event"
        return None

    # --- sending -----------------------------------------------------------------------

    def send(self, event: Event, *, force: bool = False, pipelined: bool = False) -> bytes:
        """Check that the MTA may send ``event`` now and return its packet.

        Args:
            force: skip every check (to feed a milter illegal input); the state is still
                updated and a reply is still awaited when the flags say one comes.
            pipelined: send it while replies to earlier commands are still owed (they are
                then expected in order); the other checks still apply.

        Raises:
            LocalProtocolError: the command is not allowed now; nothing changes.
            TypeError: the event has no packet form.
        """
        data = encode_command(event)
        command = data[4]  # after the four length bytes
        if not force:
            size = len(event.chunk) if isinstance(event, Body) else 0
            self._check_send(command, type(event).__name__, size, pipelined)
        if isinstance(event, Negotiate):
            self._offered = True
            self.offer = event  # replies are checked against what was actually sent
        self._after_send(command, event.stage if isinstance(event, Macros) else None)
        return data

    def send_packet(self, command: bytes, payload: bytes, *, pipelined: bool = False) -> bytes:
        """As :meth:`send`, for a command given as its letter and payload: what a proxy
        forwards without building a model. Not for the offer.

        Raises:
            LocalProtocolError: the command is not allowed now (or is the offer).
        """
        code = command[0]
        name = _EVENT_NAMES.get(code, repr(command))
        if code == _O:
            raise LocalProtocolError(f"{name} refused: send the offer with send()", command="O")
        self._check_send(code, name, len(payload) if code == _B else 0, pipelined)
        self._after_send(code, chr(payload[0]) if code == _D and payload else None)
        return encode_frame(command, payload)

    def send_packets(self, packets: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, int]:
        """Check and send several commands at once, each a letter and its payload (a
        pipelining client's batch); return their bytes and how many replies they owe.

        Replies to earlier commands may still be owed: all are expected in order. Nothing
        is sent unless every command may be.

        Raises:
            LocalProtocolError: a command may not be sent now; nothing changes.
        """
        checked: set[int] = set()  # (the state cannot get stricter within a batch)
        for command, payload in packets:
            code = command[0]
            if code in checked and code != _B:
                continue
            checked.add(code)
            name = _EVENT_NAMES.get(code, repr(command))
            if code == _O:
                raise LocalProtocolError(f"{name} refused: send the offer with send()", command="O")
            self._check_send(code, name, len(payload) if code == _B else 0, True)
        replied = (self._options or UNNEGOTIATED).replied_commands
        out: list[bytes] = []
        owed = 0
        for command, payload in packets:
            code = command[0]
            if code in (_M, _A) or (code == _D and payload[:1] == b"M"):
                self._message_over = self._skipped = False
            if code in replied:
                self._owed.append(code)
                owed += 1
            out.append(encode_frame(command, payload))
        return b"".join(out), owed

    def _check_send(self, command: int, name: str, size: int, pipelined: bool) -> None:
        """Refuse a command that may not be sent now (``size``: a body chunk's length)."""
        letter = chr(command)

        def refuse(why: str) -> LocalProtocolError:
            return LocalProtocolError(f"{name} refused: {why}", command=letter)

        if not self._offered:
            if command != _O:
                raise refuse("the offer (Negotiate) must be sent first")
            return
        if command == _O:
            raise refuse("option negotiation happens once per connection")
        if self._owed and not pipelined:
            raise refuse(f"the reply to {chr(self._owed[0])!r} is still owed")
        if self._closed:
            raise refuse("QUIT was sent")
        if command == _D:
            return
        if self._connection_done and command not in _AFTER_CONNECTION_VERDICT:
            raise refuse("after a connection-level verdict only ABORT, macros and QUIT follow")
        why = self._suppression(command)
        if why is not None:
            raise refuse(why)
        if command in _MESSAGE_COMMANDS and self._message_over:
            raise refuse("the message already has its verdict; send MAIL or ABORT first")
        if command == _B and self._skipped:
            raise refuse("the milter answered Skip; end of message comes next")
        limit = (self._options or UNNEGOTIATED).max_data_size
        if size > limit:
            raise refuse(f"body chunk of {size} bytes exceeds {limit}")

    def _after_send(self, command: int, macro_stage: str | None) -> None:
        if command in (_M, _A) or macro_stage == "M":
            # Both MTAs send D for MAIL even when MAIL is suppressed: a new message begins.
            self._message_over = self._skipped = False
        elif command == _Q:
            self._closed = True
        elif command == _K:
            self._connection_done = self._message_over = self._skipped = False
        if (self._options or UNNEGOTIATED).reply_expected(command):
            self._owed.append(command)

    # --- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the milter; ``b""`` means the milter closed the connection."""
        if not data:
            self._eof = True
        elif self._eof:
            raise RemoteProtocolError("data received after end of file")
        else:
            self._frames.feed(data)

    def next_reply(self) -> Reply | None:
        """Return the next reply, checked against the command it answers; None if incomplete.

        Raises:
            RemoteProtocolError: the milter sent a malformed reply, a reply out of turn, or
                closed the connection while a reply was owed.
        """
        if self._failed:
            raise RemoteProtocolError("the connection already failed with a protocol error")
        try:
            frame = self._frames.next_frame()
            if frame is None:
                if self._eof:
                    self._frames.check_eof()
                    if self._owed:
                        raise RemoteProtocolError(
                            "the milter closed the connection while a reply was owed",
                            command=chr(self._owed[0]),
                        )
                return None
            code, payload = frame
            owed = self._owed
            if code == _CONTINUE_CODE and not payload and owed and owed[0] in _GOES_ON:
                # The usual answer, to a command it does not end: nothing else to check.
                owed.popleft()
                return _CONTINUE
            reply = decode_response(code, payload)
            self._take(code, reply)
        except RemoteProtocolError:
            self._failed = True
            raise
        return reply

    def collect_answer(self) -> Answer | None:
        """Return the whole answer to the oldest owed command once its final reply is in.

        Modifications and progress are kept across calls until then; None means more data
        is needed. Do not mix with :meth:`next_reply` within one answer.
        """
        while (reply := self.next_reply()) is not None:
            if isinstance(reply, Progress):
                self._progress += 1
            elif isinstance(reply, Modification):
                self._modifications.append(reply)
            else:
                verdict = None if isinstance(reply, NegotiationReply) else reply
                answer = Answer(self._modifications, self._progress, verdict)
                self._modifications, self._progress = [], 0
                return answer
        return None

    def _take(self, code: int, reply: Reply) -> None:
        name = type(reply).__name__
        if not self._owed:
            raise RemoteProtocolError(f"{name} received while no reply is owed", command=chr(code))
        command = self._owed[0]
        letter = chr(command)
        if isinstance(reply, NegotiationReply):
            if command != _O:
                raise RemoteProtocolError(f"negotiation reply in answer to {letter!r}", command="O")
            options = self._options = self._negotiated(reply)
            self._reply = reply
            self._suppressed_commands = frozenset(
                command
                for command, stage in _OPTIONAL.items()
                if options.protocol & stage.suppress or options.version < stage.since
            )
        elif command == _O:
            raise RemoteProtocolError(
                f"{name} in answer to the offer; expected the negotiation reply", command=chr(code)
            )
        elif isinstance(reply, Progress | Modification):
            if command != _E:
                raise RemoteProtocolError(
                    f"{name} is only allowed while end of message is owed, not in answer to "
                    f"{letter!r}",
                    command=chr(code),
                )
            return  # the command still waits for its verdict
        else:
            self._check_verdict(command, code, reply)
        self._owed.popleft()

    def _negotiated(self, reply: NegotiationReply) -> SessionOptions:
        try:
            return session_options(self.offer, reply)
        except LocalProtocolError as exc:
            # Our own check of a reply we send is, on this side, the milter's fault.
            error = RemoteProtocolError(str(exc))
            error.command = exc.command
            raise error from None

    def _check_verdict(self, command: int, code: int, reply: Verdict | Shutdown) -> None:
        legal = LEGAL_REPLIES.get(command, ())
        if not isinstance(reply, legal):
            names = ", ".join(cls.__name__ for cls in legal)
            raise RemoteProtocolError(
                f"{type(reply).__name__} is not a valid answer to {chr(command)!r}; valid: {names}",
                command=chr(code),
            )
        if isinstance(reply, Skip) and not (self._options or UNNEGOTIATED).skip:
            raise RemoteProtocolError("Skip without the SKIP protocol flag", command=chr(code))
        stage = BY_COMMAND[command]
        if isinstance(reply, Shutdown) or (
            stage.scope == "connection" and not isinstance(reply, stage.goes_on)
        ):
            self._connection_done = True
        elif isinstance(reply, Skip):
            self._skipped = True
        elif stage.scope == "message" and not isinstance(reply, stage.goes_on):
            self._message_over = True
