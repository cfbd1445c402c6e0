"""Send whole messages to a milter the way Postfix or Sendmail would, and see what happened.

:class:`AsyncMilterTestClient` plays one MTA connection: negotiation, connect, HELO, then any
number of messages, each split into the commands and macros the chosen MTA profile sends. It
talks to an App in memory (through the server's own connection handler) or to any milter
over a socket. :class:`MilterTestClient` is the same for plain, synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal, Self

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
    """

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

    async def connect(
        self,
        *,
        client_address: str | None = None,
        client_name: str | None = None,
        helo: str | None = None,
    ) -> list[Answer]:
        """Send CONNECT and HELO; return the answers (none if the milter skipped them)."""
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
        answers = [
            await self._command(connect, "connect", None),
            await self._command(Helo(name=facts.helo), "helo", None),
        ]
        self._connected = True
        return [answer for answer in answers if answer is not None]

    async def send_message(
        self,
        message: bytes | str | EmailMessage,
        *,
        sender: str = "sender@example.org",
        recipients: Sequence[str] = ("recipient@example.net",),
        mail_args: Iterable[str] = (),
        macros: Mapping[str, Mapping[str, str]] | None = None,
    ) -> MessageResult:
        """Send one message as the MTA would; return what happened to it."""
        if not self._connected:
            await self.connect()
        if isinstance(message, EmailMessage):
            message = message.as_bytes(policy=email.policy.SMTP)
        elif isinstance(message, str):
            message = message.encode()
        try:
            headers, body = parse_message(message)
        except ValueError as exc:
            raise ValueError(f"the message to send is malformed: {exc}") from None
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
            outcome = await self._envelope(result, sender, recipients, list(mail_args))
            if outcome is None:
                outcome = await self._content(result, headers, body)
            result.verdict, result.stage = outcome
            await self._end_message(result, sender, headers, body)
        finally:
            self.facts = self.facts.model_copy(update={"extra": session_extra})
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
        self, result: MessageResult, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[Verdict | Shutdown, str]:
        options = self.mta.options
        leading = bool(options and options.leading_space)
        events: list[Event] = [Data()]
        # parse_message dropped the space after each colon; the MTA sees the line with it.
        events += [self.profile.header_for_milter(n, f" {v}", leading) for n, v in headers]
        events.append(EndOfHeaders())
        size = self.profile.body_chunk_size
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
            )
        if self.profile.abort_after_each_message or result.stage != "eom":
            await self._send(Abort())

    async def abort(self) -> None:
        """Abort the current transaction (as after RSET)."""
        await self._send(Abort())


class MilterTestClient:
    """:class:`AsyncMilterTestClient` for synchronous tests: same arguments, same methods."""

    def __init__(self, app: App | None = None, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = AsyncMilterTestClient(app, **options)
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
        return self._client.mta

    def connect(self, **facts: Any) -> list[Answer]:
        self._ensure_open()
        return self._runner.run(self._client.connect(**facts))

    def send_message(self, message: bytes | str | EmailMessage, **options: Any) -> MessageResult:
        self._ensure_open()
        return self._runner.run(self._client.send_message(message, **options))

    def abort(self) -> None:
        self._ensure_open()
        self._runner.run(self._client.abort())

    def close(self) -> None:
        try:
            if self._opened:
                self._runner.run(self._client.close())
        finally:
            self._runner.close()
