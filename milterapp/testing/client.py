"""Send whole messages to a milter the way Postfix or Sendmail would, and see what happened.

:class:`AsyncMilterTestClient` plays one MTA connection: negotiation, connect, HELO, then any
number of messages, each split into the commands and macros the chosen MTA profile sends. It
talks to an App in memory (through the server's own connection handler) or to any milter
over a socket. :class:`MilterTestClient` is the same for plain, synchronous tests.

Arguments are taken as a person types them: ``recipients="bob@example.net"`` is one
recipient, and an unknown option is refused with the list of the valid ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import email.policy
import functools
import inspect
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal, ParamSpec, Self, TypeVar

from milterapp.app import App
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Helo,
    Macros,
    Quit,
)
from milterapp.protocol.mta import Answer, MtaConnection
from milterapp.protocol.stages import STAGES
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Verdict,
)
from milterapp.server.connection import Connection
from milterapp.spec import ConnectionSpec
from milterapp.testing.delivery import apply, parse_message
from milterapp.testing.pipe import READ_SIZE, connect_protocol
from milterapp.testing.profiles import MtaProfile, SessionFacts, profile
from milterapp.testing.results import MessageResult, StageReply

__all__ = ["AsyncMilterTestClient", "MessageResult", "MilterTestClient", "StageReply"]

#: The stage name of each event the client sends.
_STAGE_OF: dict[type[Event], str] = {stage.event: stage.name for stage in STAGES}
#: The facts of the SMTP connection that ``connect()`` and ``send_message()`` take.
_CONNECTION_FACTS = ("client_address", "client_name", "helo")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _checked_options(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Refuse an unknown keyword option, naming it and listing the valid ones.

    Python's own error names the option but not the alternatives; a typo in a test
    (``recipient=``, ``helo_name=``) then needs a trip to the documentation.
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = tuple(
        parameter.name
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in kinds and parameter.name != "self"
    )
    where = function.__qualname__.removesuffix(".__init__") + "()"

    @functools.wraps(function)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        for name in kwargs:
            if name not in valid:
                raise TypeError(_unknown_option(where, name, valid))
        return function(*args, **kwargs)

    return checked


def _unknown_option(where: str, name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where} got an unknown option {name!r}{hint}; its options are: {', '.join(valid)}"


def _recipient_list(recipients: str | Iterable[str]) -> list[str]:
    """One recipient as a string, or several; at least one."""
    found = [recipients] if isinstance(recipients, str) else list(recipients)
    for recipient in found:
        if not isinstance(recipient, str):
            raise TypeError(f"a recipient must be a str, not {recipient!r}")
    if not found or not all(found):
        raise ValueError(
            f"send_message() needs at least one recipient, each non-empty; got {recipients!r} "
            '(one recipient may be given as a str: recipients="bob@example.net")'
        )
    return found


def _mail_arg_list(mail_args: str | Iterable[str]) -> list[str]:
    """ESMTP parameters as a list, or as written on the MAIL FROM line (space-separated)."""
    if isinstance(mail_args, str):
        return mail_args.split()
    found = list(mail_args)
    for arg in found:
        if not isinstance(arg, str) or not arg or any(c.isspace() for c in arg):
            raise ValueError(f"an ESMTP parameter must be a word like 'SIZE=1024', not {arg!r}")
    return found


class AsyncMilterTestClient:
    """One MTA connection to a milter, sending whole messages (use ``async with``).

    Args:
        app: an App to drive in memory; or pass ``target`` instead.
        target: a connection spec or ``(host, port)`` of any running milter.
        mta: ``"postfix"`` (default), ``"sendmail"``, or an :class:`MtaProfile`.
        raise_errors: re-raise a handler's exception in the test (in-memory only) instead of
            the app's fallback reply, so a bug shows as a traceback.
        facts: the client, MTA and session details that macros are made from.
        timeout: seconds to wait for any answer.

    An unknown keyword option, to the constructor or a method, raises TypeError naming it
    and listing the valid ones.
    """

    @_checked_options
    def __init__(
        self,
        app: App | None = None,
        *,
        target: str | ConnectionSpec | tuple[str, int] | None = None,
        mta: Literal["postfix", "sendmail"] | MtaProfile = "postfix",
        raise_errors: bool = True,
        facts: SessionFacts | None = None,
        timeout: float = 30.0,
    ) -> None:
        if (app is None) == (target is None):
            raise ValueError("give either an App (in memory) or a target (a running milter)")
        self.app = app
        self.target = target
        self.profile = profile(mta)
        self.mta = MtaConnection(self.profile.offer)
        self.facts = facts or SessionFacts()
        self.raise_errors = raise_errors
        self.timeout = timeout
        self.handler: Connection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = False
        #: The answer that ended the milter's part in this connection (a verdict other than
        #: Continue at CONNECT or HELO, or Shutdown): later messages are decided by it.
        self._connection_verdict: StageReply | None = None
        self._queue_ids = 0

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the connection (in memory, or to the target) and negotiate."""
        if self.app is not None:
            if not self.app.serving.started:
                await self.app.run_startup()
            self.handler = Connection(
                self.app, self.app.requirements(), raise_errors=self.raise_errors
            )
            self._reader, self._writer = connect_protocol(self.handler, "mta", "milter")
        else:
            from milterapp.testing.sockets import MtaClient

            assert self.target is not None
            client = await MtaClient.connect(self.target, timeout=self.timeout)
            self._reader, self._writer = client.reader, client.writer
        await self._send(self.mta.offer)
        reply = self.mta.reply
        if reply is not None and reply.macros:  # the MTA now sends the lists the milter asked for
            self.profile = self.profile.with_requested_macros(reply.macros)

    async def close(self) -> None:
        """Quit, close the connection, and re-raise a handler error the milter hit."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            if not self.mta.awaiting_reply:
                with contextlib.suppress(ConnectionError):  # the milter may have gone already
                    writer.write(self.mta.send(Quit(), force=True))
            writer.close()
        if self.handler is not None:
            await asyncio.wait_for(asyncio.shield(self.handler.done), self.timeout)
        self._raise_handler_error()

    def _raise_handler_error(self) -> None:
        handler = self.handler
        if self.raise_errors and handler is not None and handler.error is not None:
            error, handler.error = handler.error, None
            raise error

    async def _send(self, event: Event) -> Answer | None:
        assert self._writer is not None
        assert self._reader is not None
        self._writer.write(self.mta.send(event))
        await self._writer.drain()
        if not self.mta.awaiting_reply:
            return None
        while (answer := self.mta.collect_answer()) is None:
            async with asyncio.timeout(self.timeout):
                data = await self._reader.read(READ_SIZE)
            if not data:
                if self.handler is not None:
                    await asyncio.wait_for(asyncio.shield(self.handler.done), self.timeout)
                self._raise_handler_error()
            self.mta.receive_data(data)
        self._raise_handler_error()  # the handler failed: its answer is only the fallback
        return answer

    async def _command(
        self, event: Event, stage: str, result: MessageResult | None
    ) -> Answer | None:
        """Send the stage's macros (as the MTA does) and the command unless suppressed."""
        letter = event.command.decode()
        values = self.profile.macro_values(letter, self.facts)
        if values or self.profile.sends_macros_without_values:
            await self._send(Macros(stage=letter, values=values))
        if self.mta.suppressed(event):
            return None
        answer = await self._send(event)
        if answer is not None and result is not None:
            result.replies.append(StageReply(stage, event, answer))
        return answer

    @property
    def connected(self) -> bool:
        """True once the client has connected (by :meth:`connect` or its first message)."""
        return self._connected

    @_checked_options
    async def connect(
        self,
        *,
        client_address: str | None = None,
        client_name: str | None = None,
        helo: str | None = None,
    ) -> list[Answer]:
        """Send CONNECT and HELO; return the answers (none if the milter skipped them).

        The details not given come from ``facts`` (the defaults of :class:`SessionFacts`).
        A verdict other than Continue at CONNECT ends the milter's part in the connection, as
        in the MTA: HELO is not sent, and every message of this client gets that verdict.
        One client is one SMTP connection: it connects once, by this call or by the first
        :meth:`send_message`. Calling this again raises RuntimeError; play another SMTP
        client with a new test client.
        """
        if self._connected:
            raise RuntimeError(
                f"this client is already connected (as {self._connection_text()}); one test "
                "client is one SMTP connection: use a new client for another SMTP client"
            )
        updates: dict[str, Any] = {}
        if client_address is not None:
            updates["client_address"] = client_address
        if client_name is not None:
            updates["client_name"] = client_name
        if helo is not None:
            updates["helo"] = helo
        self.facts = self.facts.model_copy(update=updates)
        facts = self.facts
        address = ipaddress.ip_address(facts.client_address)
        family = AddressFamily.INET6 if address.version == 6 else AddressFamily.INET
        connect = Connect(
            hostname=facts.client_name, family=family, port=facts.client_port, address=address
        )
        self._connected = True
        answers = []
        for event, stage in ((connect, "connect"), (Helo(name=facts.helo), "helo")):
            answer = await self._command(event, stage, None)
            if answer is None:
                continue
            answers.append(answer)
            if answer.verdict is not None and not isinstance(answer.verdict, Continue):
                self._connection_verdict = StageReply(stage, event, answer)
                break
        return answers

    def _connection_text(self) -> str:
        return ", ".join(f"{name}={getattr(self.facts, name)!r}" for name in _CONNECTION_FACTS)

    async def _connect_for_message(self, wanted: dict[str, str | None]) -> None:
        """Connect with the facts a message asks for, or check that they are the ones in use."""
        if not self._connected:
            await self.connect(**wanted)
            return
        differ = {
            name: value
            for name, value in wanted.items()
            if value is not None and value != getattr(self.facts, name)
        }
        if differ:
            asked = ", ".join(f"{name}={value!r}" for name, value in differ.items())
            raise ValueError(
                f"send_message({asked}): this client is already connected as "
                f"{self._connection_text()}, and one test client is one SMTP connection. "
                "Give these details to the first send_message() or to connect(), or use a new "
                "client for another SMTP client"
            )

    @_checked_options
    async def send_message(
        self,
        message: bytes | str | EmailMessage,
        *,
        sender: str = "sender@example.org",
        recipients: str | Iterable[str] = ("recipient@example.net",),
        mail_args: str | Iterable[str] = (),
        macros: Mapping[str, Mapping[str, str]] | None = None,
        client_address: str | None = None,
        client_name: str | None = None,
        helo: str | None = None,
        body_chunk_size: int | None = None,
    ) -> MessageResult:
        """Send one message as the MTA would; return what happened to it.

        Args:
            message: bytes, text or an :class:`~email.message.EmailMessage`; bare LF line
                endings are sent as CRLF.
            sender: the envelope sender, without angle brackets (``""``: the null sender).
            recipients: one recipient as a str, or several; at least one.
            mail_args: ESMTP parameters of MAIL FROM: a list (``["SIZE=1024"]``) or a str as
                on the command line (``"SIZE=1024 BODY=8BITMIME"``).
            macros: macros to add or override for this message, per stage letter.
            client_address, client_name, helo: the SMTP connection's details. They apply to
                the connection, so they are used when this message opens it (the first
                message, when :meth:`connect` was not called). Once connected, the same
                values are accepted and different ones raise ValueError: one test client is
                one SMTP connection; use a new client for another SMTP client.
            body_chunk_size: the body in chunks of this many bytes, from 1 to the MTA's
                largest (the default: 65,535 for both). MTAs cut the body where their
                buffers end, so a handler that reads chunks must find a word split across
                two: chunks of every size from 1 up test each place it may be cut.
        """
        largest = self.profile.body_chunk_size
        if body_chunk_size is not None and not 1 <= body_chunk_size <= largest:
            raise ValueError(
                f"body_chunk_size: must be 1 to {largest} bytes (what the MTA sends at most), "
                f"not {body_chunk_size}"
            )
        recipient_list = _recipient_list(recipients)
        mail_arg_list = _mail_arg_list(mail_args)
        await self._connect_for_message(
            {"client_address": client_address, "client_name": client_name, "helo": helo}
        )
        if isinstance(message, EmailMessage):
            message = message.as_bytes(policy=email.policy.SMTP)
        elif isinstance(message, str):
            message = message.encode()
        try:
            headers, body = parse_message(message)
        except ValueError as exc:
            raise ValueError(f"the message to send is malformed: {exc}") from None
        if self._connection_verdict is not None:
            return self._decided_by_connection(sender, recipient_list, headers, body)
        self._queue_ids += 1
        session_extra = self.facts.extra
        extra = {**session_extra, **{k: dict(v) for k, v in (macros or {}).items()}}
        # The profile decides at which stages the queue id is visible (Postfix: after the
        # first accepted recipient; Sendmail: from MAIL on).
        self.facts = self.facts.model_copy(
            update={
                "sender": sender,
                "queue_id": f"Q{self._queue_ids:09X}",
                "accepted_recipients": 0,
                "recipient": None,
                "extra": extra,
            }
        )
        try:
            result = MessageResult()
            outcome = await self._envelope(result, sender, recipient_list, mail_arg_list)
            if outcome is None:
                outcome = await self._content(result, headers, body, body_chunk_size)
            result.verdict, result.stage = outcome
            await self._end_message(result, sender, headers, body)
        finally:
            self.facts = self.facts.model_copy(update={"extra": session_extra})
        if isinstance(result.verdict, Shutdown):  # the MTA ends the SMTP session: 421
            self._connection_verdict = next(
                (r for r in reversed(result.replies) if isinstance(r.verdict, Shutdown)), None
            )
        return result

    def _decided_by_connection(
        self, sender: str, recipients: list[str], headers: list[tuple[str, str]], body: bytes
    ) -> MessageResult:
        """The result of a message once the milter's part in the connection is over.

        The MTA sends the milter nothing more: a refusal (or Shutdown) refuses the message
        before any recipient; after Accept the message is delivered unchanged.
        """
        decided = self._connection_verdict
        assert decided is not None
        assert decided.verdict is not None
        result = MessageResult(replies=[decided], verdict=decided.verdict, stage=decided.stage)
        if result.accepted:
            result.recipients = {recipient: Continue() for recipient in recipients}
            result.delivered = apply(
                [],
                sender=sender,
                recipients=recipients,
                headers=headers,
                body=body,
                profile=self.profile,
            )
        return result

    async def _envelope(
        self, result: MessageResult, sender: str, recipients: Sequence[str], mail_args: list[str]
    ) -> tuple[Verdict | Shutdown, str] | None:
        mail = EnvFrom.from_raw(f"<{sender}>", mail_args)
        answer = await self._command(mail, "envfrom", result)
        if answer is not None and not isinstance(answer.verdict, Continue):
            return answer.verdict or Continue(), "envfrom"
        accepted = 0
        for recipient in recipients:
            update = {"recipient": recipient, "accepted_recipients": accepted}
            self.facts = self.facts.model_copy(update=update)
            answer = await self._command(EnvRcpt.from_raw(f"<{recipient}>"), "envrcpt", result)
            verdict: Verdict | Shutdown = (
                answer.verdict if answer and answer.verdict else Continue()
            )
            result.recipients[recipient] = verdict
            if isinstance(verdict, Accept | Discard | Shutdown):
                return verdict, "envrcpt"
            if isinstance(verdict, Continue):
                accepted += 1
        if not accepted:  # every recipient refused: no DATA
            return next(iter(result.recipients.values()), Reject()), "envrcpt"
        self.facts = self.facts.model_copy(update={"accepted_recipients": accepted})
        return None

    async def _content(
        self,
        result: MessageResult,
        headers: list[tuple[str, str]],
        body: bytes,
        chunk_size: int | None = None,
    ) -> tuple[Verdict | Shutdown, str]:
        options = self.mta.options
        leading = bool(options and options.leading_space)
        events: list[Event] = [Data()]
        # parse_message dropped the space after each colon; the MTA sees the line with it.
        events += [self.profile.header_for_milter(n, f" {v}", leading) for n, v in headers]
        events.append(EndOfHeaders())
        size = chunk_size or self.profile.body_chunk_size
        events += [Body(chunk=body[i : i + size]) for i in range(0, len(body), size)]
        skipping = False
        for event in events:
            if skipping and isinstance(event, Body):
                continue
            answer = await self._command(event, _STAGE_OF[type(event)], result)
            verdict = answer.verdict if answer else None
            if isinstance(verdict, Continue) or verdict is None:
                continue
            if verdict.__class__.__name__ == "Skip":
                skipping = True
                continue
            return verdict, result.replies[-1].stage
        answer = await self._command(EndOfMessage(), "eom", result)
        assert answer is not None
        result.modifications = list(answer.modifications)
        return answer.verdict or Continue(), "eom"

    async def _end_message(
        self, result: MessageResult, sender: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        if result.accepted:
            accepted = [r for r, v in result.recipients.items() if isinstance(v, Continue | Accept)]
            result.delivered = apply(
                result.modifications,
                sender=sender,
                recipients=accepted,
                headers=headers,
                body=body,
                profile=self.profile,
                # With HDR_LEADSPC a value carries the space after the colon itself.
                leading_space=bool(self.mta.options and self.mta.options.leading_space),
            )
        if self.profile.abort_after_each_message or result.stage != "eom":
            await self._send(Abort())

    async def abort(self) -> None:
        """Abort the current transaction (as after RSET)."""
        await self._send(Abort())


class MilterTestClient:
    """:class:`AsyncMilterTestClient` for synchronous tests: same arguments, same methods.

    The signatures repeat the async client's, so that type checkers check the arguments here
    too (a test makes sure they stay the same).
    """

    @_checked_options
    def __init__(
        self,
        app: App | None = None,
        *,
        target: str | ConnectionSpec | tuple[str, int] | None = None,
        mta: Literal["postfix", "sendmail"] | MtaProfile = "postfix",
        raise_errors: bool = True,
        facts: SessionFacts | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._client = AsyncMilterTestClient(
            app,
            target=target,
            mta=mta,
            raise_errors=raise_errors,
            facts=facts,
            timeout=timeout,
        )
        self._runner = asyncio.Runner()
        self._opened = False

    def __enter__(self) -> Self:
        self._ensure_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ensure_open(self) -> None:
        if not self._opened:
            self._opened = True
            self._runner.run(self._client.open())

    @property
    def mta(self) -> MtaConnection:
        """The MTA side's state machine (what was negotiated: ``mta.options``)."""
        return self._client.mta

    @property
    def facts(self) -> SessionFacts:
        """The session's details, as the macros are made from them."""
        return self._client.facts

    @property
    def connected(self) -> bool:
        """True once the client has connected (by :meth:`connect` or its first message)."""
        return self._client.connected

    @_checked_options
    def connect(
        self,
        *,
        client_address: str | None = None,
        client_name: str | None = None,
        helo: str | None = None,
    ) -> list[Answer]:
        """See :meth:`AsyncMilterTestClient.connect`."""
        self._ensure_open()
        return self._runner.run(
            self._client.connect(client_address=client_address, client_name=client_name, helo=helo)
        )

    @_checked_options
    def send_message(
        self,
        message: bytes | str | EmailMessage,
        *,
        sender: str = "sender@example.org",
        recipients: str | Iterable[str] = ("recipient@example.net",),
        mail_args: str | Iterable[str] = (),
        macros: Mapping[str, Mapping[str, str]] | None = None,
        client_address: str | None = None,
        client_name: str | None = None,
        helo: str | None = None,
        body_chunk_size: int | None = None,
    ) -> MessageResult:
        """See :meth:`AsyncMilterTestClient.send_message`."""
        self._ensure_open()
        return self._runner.run(
            self._client.send_message(
                message,
                sender=sender,
                recipients=recipients,
                mail_args=mail_args,
                macros=macros,
                client_address=client_address,
                client_name=client_name,
                helo=helo,
                body_chunk_size=body_chunk_size,
            )
        )

    def abort(self) -> None:
        self._ensure_open()
        self._runner.run(self._client.abort())

    def close(self) -> None:
        try:
            if self._opened:
                self._runner.run(self._client.close())
        finally:
            self._runner.close()
