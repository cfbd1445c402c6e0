"""One conversation with one upstream milter, spoken from the MTA's side, over asyncio.

:meth:`UpstreamConnection.open` connects to the milter at a spec and negotiates;
:meth:`~UpstreamConnection.send` sends one command (and its macros) and returns the milter's
:class:`~milterapp.protocol.mta.Answer`. The sans-IO :class:`~milterapp.protocol.mta.MtaConnection`
checks every byte both ways; this module adds the sockets and the deadlines.

Every read and write is bounded: connecting and negotiating by ``connect_timeout``, each other
command by ``command_timeout``, end of message by ``eom_timeout`` (restarted by each progress
packet). Whatever goes wrong with the upstream is an :class:`UpstreamFailure` whose ``kind``
says what: ``unreachable``, ``negotiation``, ``timeout``, ``protocol`` or ``closed``. After a
failure the socket is closed and every later call fails at once with the same kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, NoReturn, Self

from milterapp.chain.link import QUOTED, Link, connect
from milterapp.chain.options import FailureKind, UpstreamFailure, UpstreamOptions
from milterapp.constants import MAX_VERSION
from milterapp.errors import ProtocolError, RemoteProtocolError
from milterapp.events import (
    Abort,
    EndOfMessage,
    EnvFrom,
    Event,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
)
from milterapp.protocol.mta import DEFAULT_OFFER, Answer, MtaConnection
from milterapp.protocol.negotiation import SessionOptions
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Modification,
    NegotiationReply,
    Progress,
    Reject,
    TempFail,
)
from milterapp.spec import ConnectionSpec

__all__ = ["UpstreamConnection"]

#: Largest reply packet accepted. Milters send small packets (body replacements come in
#: 64 KiB chunks); a low limit makes a text greeting read as a length ("HTTP" is 1.2 GB,
#: any printable first byte is over 512 MiB) fail on arrival instead of at the deadline.
_MAX_REPLY_SIZE: Final = 16 << 20
#: Verdicts after which a milter takes no more of the message.
_FINAL: Final = (Reject, TempFail, Discard, Accept)
#: What each command is called in a failure's detail.
_PENDING: Final = {
    "C": "connect",
    "H": "HELO",
    "M": "MAIL",
    "R": "RCPT",
    "T": "DATA",
    "L": "a header",
    "N": "end of headers",
    "B": "a body chunk",
    "E": "end of message",
    "A": "abort",
    "K": "QUIT_NC",
}


class _PeerClosed(Exception):
    """The upstream closed its side (end of file)."""


def _unreachable(spec: ConnectionSpec, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such socket at {spec}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {spec}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {spec.connect_host}: {exc.strerror}"
    return f"cannot connect to {spec}: {(exc.strerror or str(exc)).lower()}"


def _not_a_reply(heard: bytes, exc: ProtocolError | None) -> str:
    if exc is not None and heard[4:5] == b"O":
        return f"invalid negotiation reply: {exc}"  # a milter's packet, with a wrong reply
    quoted = repr(heard[:QUOTED]) + ("..." if len(heard) > QUOTED else "")
    return f"not a milter: answered {quoted}"


class UpstreamConnection:
    """One negotiated connection to an upstream milter, made by :meth:`open`; ``config`` holds
    the :class:`UpstreamOptions` it was opened with."""

    def __init__(self, config: UpstreamOptions, link: Link, mta: MtaConnection) -> None:
        self.config = config
        self._link = link
        self._mta = mta
        self._failure: UpstreamFailure | None = None
        self._closed = False
        #: The last command was end of message, answered Continue: the one state from which
        #: libmilter takes QUIT_NC (after Accept, a refusal or an abort it ignores it, and
        #: then the next CONNECT too).
        self._at_rest = False

    @property
    def name(self) -> str:
        """The upstream's name, as in every failure it raises."""
        return self.config.name

    @property
    def reply(self) -> NegotiationReply:
        """The upstream's negotiation reply."""
        assert self._mta.reply is not None  # open() returns only once it is in
        return self._mta.reply

    @property
    def options(self) -> SessionOptions:
        """What was negotiated: version, actions, protocol flags (declined events, NR flags)."""
        assert self._mta.options is not None
        return self._mta.options

    @classmethod
    async def open(
        cls, options: UpstreamOptions, offer: Negotiate = DEFAULT_OFFER
    ) -> UpstreamConnection:
        """Connect to ``options.spec`` and negotiate ``offer`` (its version capped at 6),
        both within ``options.connect_timeout``.

        Raises:
            UpstreamFailure: ``unreachable``, ``negotiation`` or ``timeout``; no socket stays
                open.
        """
        offer = Negotiate(
            version=min(offer.version, MAX_VERSION), actions=offer.actions, protocol=offer.protocol
        )
        mta = MtaConnection(offer, max_data_size=_MAX_REPLY_SIZE)
        spec, limit = options.spec, options.connect_timeout
        link: Link | None = None
        failure: UpstreamFailure | None = None
        try:
            async with asyncio.timeout(limit):
                link = await connect(spec, mta)
                connection = cls(options, link, mta)
                detail = await connection._negotiate()
            if detail is None:
                return connection
            failure = UpstreamFailure(options.name, "negotiation", detail)
        except TimeoutError:
            # A connect() that the system timed out is a TimeoutError too: both are deadlines.
            detail = f"no connection to {spec} within {limit:g} s"
            if link is not None:
                detail = f"no answer to the negotiation within {limit:g} s"
            failure = UpstreamFailure(options.name, "timeout", detail)
        except OSError as exc:
            if link is None:
                failure = UpstreamFailure(options.name, "unreachable", _unreachable(spec, exc))
            else:
                detail = "reset the connection without answering the negotiation"
                failure = UpstreamFailure(options.name, "negotiation", detail)
        finally:
            if link is not None and (failure is not None or mta.options is None):
                link.abort()  # a failure or cancellation: no socket left open
        assert failure is not None  # every way out of the try but success sets it
        raise failure

    async def _negotiate(self) -> str | None:
        """Send the offer and read the reply; None when it is in, else what went wrong."""
        mta, link = self._mta, self._link
        await link.write(mta.send(mta.offer))
        while True:
            try:
                if mta.next_reply() is not None:
                    return None
            except RemoteProtocolError as exc:
                return _not_a_reply(link.head, exc)
            if link.ended:
                if link.error is not None and not link.head:
                    raise link.error if isinstance(link.error, OSError) else OSError(link.error)
                if link.head:
                    return _not_a_reply(link.head, None)
                return "closed the connection without answering the negotiation"
            await link.wait()

    # --- the conversation --------------------------------------------------------------------

    def declined(self, event: Event) -> bool:
        """Whether the upstream asked not to receive ``event`` (a NO flag, or its version)."""
        return self._mta.suppressed(event)

    async def send(
        self,
        event: Event,
        *,
        macros: Macros | bytes | None = None,
        on_progress: Callable[[], object] | None = None,
    ) -> Answer | None:
        """Send ``macros`` (if given: a model, or a ``D`` packet's payload as received) then
        ``event``; return the upstream's answer, or None when it owes none (an NR flag) or
        declined the event.

        A declined command is not sent, but its macros are, as Sendmail and Postfix send
        them; a declined MAIL is always preceded by a ``D`` packet, which is how the upstream
        and the state machine learn that a new message begins. The answer comes within
        ``command_timeout``; for :class:`EndOfMessage` within ``eom_timeout`` of the command
        or of the last progress packet, each of which calls ``on_progress``.

        Raises:
            UpstreamFailure: ``timeout``, ``protocol`` or ``closed``; the connection is closed.
            LocalProtocolError: ``event`` may not be sent now (say, a recipient after the
                upstream rejected the message); nothing was sent and the connection goes on.
        """
        self._check_open()
        mta = self._mta
        if isinstance(macros, Macros):
            defined = mta.send(macros)
        else:
            defined = b"" if macros is None else mta.send_packet(b"D", macros)
        if mta.suppressed(event):
            if not defined and isinstance(event, EnvFrom):
                defined = mta.send(Macros(stage="M"))
            if not defined:
                return None
            data, owes = defined, False
        else:
            data = defined + mta.send(event)
            owes = mta.awaiting_reply
        eom = isinstance(event, EndOfMessage)
        limit = self.config.eom_timeout if eom else self.config.command_timeout
        return await self._exchange(data, event.command.decode(), limit, owes, on_progress)

    async def pipeline(
        self,
        packets: Sequence[tuple[bytes, bytes, bytes | None]],
        *,
        on_progress: Callable[[], object] | None = None,
    ) -> tuple[Answer, bool]:
        """Send ``packets`` (each a command letter, its payload and the payload of the
        ``D`` packet to send before it, if any: a message's content, ending with end of
        message) at once, then read their answers in order, as a client that pipelines.

        One round trip instead of one per command. Returns the answer that ends the
        exchange: that of the last command, or the first final verdict before it (Reject,
        TempFail, Discard, Accept), and whether every command was answered. In the second
        case the upstream was sent commands after its verdict, which libmilter ignores
        without a reply and stricter milters refuse: the connection is closed, and the
        caller opens a new one for the next message. Each answer comes within
        ``command_timeout`` of the one before, the last within ``eom_timeout`` (restarted
        by progress packets, each of which calls ``on_progress``). Commands the upstream
        declined are left out.

        Raises:
            UpstreamFailure: ``timeout``, ``protocol`` or ``closed``; the connection is closed.
            LocalProtocolError: a command may not be sent now; nothing was sent.
        """
        self._check_open()
        mta, link = self._mta, self._link
        self._at_rest = False
        batch: list[tuple[bytes, bytes]] = []
        owed: list[str] = []
        replied = self.options.replied_commands
        declined = mta.declined_commands
        for command, payload, macros in packets:
            if command[0] in declined:
                continue
            if macros is not None:
                batch.append((b"D", macros))
            batch.append((command, payload))
            if command[0] in replied:
                owed.append(command.decode("latin-1"))
        data, _ = mta.send_packets(batch)
        if link.ended:
            self._fail_with("closed", "closed before the message's content was sent")
        loop = asyncio.get_running_loop()
        config = self.config
        if not owed:  # (every command of the batch goes without an answer)
            await link.write(data)
            return Answer([], 0, None), True
        ends = owed[-1] == "E"  # the batch ends the message: its last answer may take long
        limit = config.eom_timeout if ends and len(owed) == 1 else config.command_timeout
        # One timer while waiting, not one per answer: answers come in bursts, and each
        # only moves the deadline on.
        link.expired = False
        armed = deadline = loop.time() + limit
        timer = loop.call_at(deadline, link.expire)
        progress = 0
        answered = 0
        last_but_one = len(owed) - 1
        modifications: list[Modification] = []
        try:
            await link.write(data)
            while True:
                reply = mta.next_reply()
                if reply is None:
                    if link.ended:
                        raise _PeerClosed
                    if link.expired or deadline != armed:
                        if loop.time() >= deadline:
                            raise TimeoutError
                        timer.cancel()
                        link.expired = False
                        armed = deadline
                        timer = loop.call_at(deadline, link.expire)
                    await link.wait()
                    continue
                if reply.__class__ is Continue and answered + 1 < last_but_one:
                    answered += 1  # the usual answer to a header or a chunk
                    deadline = loop.time() + limit
                    continue
                if isinstance(reply, Progress):
                    progress += 1
                    if on_progress is not None:
                        on_progress()
                elif isinstance(reply, Modification):
                    modifications.append(reply)
                    continue
                else:
                    assert not isinstance(reply, NegotiationReply)  # (the machine checks)
                    answered += 1
                    last = answered == len(owed)
                    if last or isinstance(reply, _FINAL):
                        if not last:
                            self.abandon()
                        self._at_rest = last and ends and isinstance(reply, Continue)
                        return Answer(modifications, progress, reply), last
                    if ends and answered == len(owed) - 1:
                        limit = config.eom_timeout
                deadline = loop.time() + limit
        except TimeoutError:
            pending = _PENDING.get(owed[answered], "a command")
            self._fail_with("timeout", f"no answer to {pending} within {limit:g} s")
        except RemoteProtocolError as exc:
            self._fail_with("protocol", f"invalid answer to the message's content: {exc}")
        except (_PeerClosed, OSError):
            pending = _PENDING.get(owed[answered] if answered < len(owed) else "E", "E")
            self._fail_with("closed", f"closed the connection while {pending} was pending")
        except BaseException as exc:
            detail = f"interrupted ({type(exc).__name__}) while the message's content was pending"
            self._fail(UpstreamFailure(self.name, "closed", detail))
            raise
        finally:
            timer.cancel()

    async def abort(self) -> None:
        """Abort the current message (no reply comes); the connection stays open."""
        self._check_open()
        await self._exchange(self._mta.send(Abort()), "A", self.config.command_timeout, False)

    @property
    def alive(self) -> bool:
        """The connection is open at both ends, as far as is known."""
        transport = self._link.transport
        return (
            not self._closed
            and not self._link.ended
            and transport is not None
            and not transport.is_closing()
        )

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another session after :meth:`recycle`: it is
        alive, its last message ended with Continue, and the upstream speaks version 6
        (whose libmilter takes QUIT_NC then)."""
        return (
            self._at_rest
            and self.alive
            and not self._mta.awaiting_reply
            and self.reply.version >= 6
        )

    async def recycle(self) -> bool:
        """End the session with QUIT_NC, keeping the connection (and its negotiation) for
        another: the next command is a CONNECT. False (and closed) when that failed."""
        if not self.reusable:
            await self.close()
            return False
        try:
            await self._exchange(
                self._mta.send(QuitNoClose()), "K", self.config.command_timeout, False
            )
        except (UpstreamFailure, ProtocolError):
            await self.close(quit=False)
            return False
        return True

    async def close(self, *, quit: bool = True) -> None:
        """Send QUIT (unless ``quit`` is false) and close; never raises, never hangs."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        # The upstream may be gone, or a reply may still be owed (QUIT is refused then):
        # closing goes on regardless, bounded as any write.
        with contextlib.suppress(ProtocolError, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(self.config.command_timeout):
                if quit and self._failure is None and not link.ended:
                    await link.write(self._mta.send(Quit()))
        transport = link.transport
        if transport is not None:
            transport.close()  # what is buffered goes out first

    def abandon(self) -> None:
        """Close at once, without QUIT (the conversation cannot go on)."""
        self._closed = True
        self._link.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- inside ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failure is not None:
            failure = self._failure
            raise UpstreamFailure(self.name, failure.kind, f"already failed: {failure.detail}")
        if self._closed:
            raise UpstreamFailure(self.name, "closed", "the connection was closed by our side")

    async def _exchange(
        self,
        data: bytes,
        letter: str,
        limit: float,
        owes: bool,
        on_progress: Callable[[], object] | None = None,
    ) -> Answer | None:
        link, mta = self._link, self._mta
        self._at_rest = False
        if link.ended:
            # Gone while idle: a command owing no reply would vanish without a trace.
            self._fail_with("closed", f"closed before {_PENDING.get(letter, letter)} was sent")
        loop = asyncio.get_running_loop()
        link.expired = False
        timer = loop.call_at(loop.time() + limit, link.expire)
        progress = 0
        try:
            if data:
                await link.write(data)
            if not owes:
                return None
            modifications: list[Modification] = []
            while True:
                reply = mta.next_reply()
                if reply is None:
                    if link.expired:
                        raise TimeoutError
                    if link.ended:
                        raise _PeerClosed
                    await link.wait()
                elif isinstance(reply, Progress):
                    progress += 1
                    timer.cancel()
                    timer = loop.call_at(loop.time() + limit, link.expire)
                    if on_progress is not None:
                        on_progress()
                elif isinstance(reply, Modification):
                    modifications.append(reply)
                else:
                    verdict = None if isinstance(reply, NegotiationReply) else reply
                    self._at_rest = letter == "E" and isinstance(verdict, Continue)
                    return Answer(modifications, progress, verdict)
        except TimeoutError:
            since = f" of progress packet {progress}" if progress else ""
            pending = _PENDING.get(letter, letter)
            self._fail_with("timeout", f"no answer to {pending} within {limit:g} s{since}")
        except RemoteProtocolError as exc:
            pending = _PENDING.get(letter, letter)
            self._fail_with("protocol", f"invalid answer to {pending}: {exc}")
        except _PeerClosed:
            error = link.error
            pending = _PENDING.get(letter, letter)
            if isinstance(error, OSError):
                what = "reset" if isinstance(error, ConnectionResetError) else "lost"
                detail = f"{what} the connection while {pending} was pending"
                self._fail_with("closed", f"{detail} ({error.strerror or error})")
            self._fail_with("closed", f"closed the connection while {pending} was pending")
        except OSError as exc:
            what = "reset" if isinstance(exc, ConnectionResetError) else "lost"
            pending = _PENDING.get(letter, letter)
            detail = f"{what} the connection while {pending} was pending"
            self._fail_with("closed", f"{detail} ({exc.strerror or exc})")
        except BaseException as exc:
            # Cancelled, or on_progress raised, with an answer perhaps half read: the
            # conversation cannot go on.
            pending = _PENDING.get(letter, letter)
            detail = f"interrupted ({type(exc).__name__}) while {pending} was pending"
            self._fail(UpstreamFailure(self.name, "closed", detail))
            raise
        finally:
            timer.cancel()
        raise AssertionError("unreachable")  # every branch above returns or raises

    def _fail_with(self, kind: FailureKind, detail: str) -> NoReturn:
        failure = UpstreamFailure(self.name, kind, detail)
        self._fail(failure)
        raise failure

    def _fail(self, failure: UpstreamFailure) -> None:
        self._failure = failure
        self._closed = True
        self._link.abort()
