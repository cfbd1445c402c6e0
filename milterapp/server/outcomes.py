"""One log line per message and per connection: what the milter did, for the administrator.

A mail administrator answers "what happened to queue id 4F2A1C?" with one ``grep``: each
message that ends (with a verdict, an abort, or the connection closing) gives one ``message``
line at info level, bound like every line of the connection (``conn_id``, ``peer``,
``client``) and carrying the queue id as the MTA reported it. Each connection gives one
``connection_closed`` line with its message count and duration. At debug level, each event
gives an ``event`` line with its reply and the time it took.

Everything here is skipped unless the logger would print it: with ``--log-level WARNING``
the per-message path pays one attribute test (docs/operations.md lists every field).
"""

from __future__ import annotations

import time
from typing import Any, Final

from milterapp.context import Context
from milterapp.events import EnvFrom, Event
from milterapp.message import Message
from milterapp.protocol.stages import BY_EVENT
from milterapp.replies import Continue, Reject, Reply, TempFail

__all__ = [
    "count_modification",
    "enabled_for",
    "envelope_address",
    "log_connection",
    "log_event",
    "log_message",
    "stage_name",
    "verdict_name",
]

#: How each modification is counted in the ``message`` line.
_MODIFICATION_NAMES: Final = {
    "AddHeader": "add_header",
    "InsertHeader": "insert_header",
    "ChangeHeader": "change_header",
    "AddRecipient": "add_recipient",
    "DeleteRecipient": "delete_recipient",
    "ChangeSender": "change_sender",
    "ReplaceBody": "replace_body",
    "Quarantine": "quarantine",
}


def enabled_for(logger: Any, level: int) -> bool:
    """Whether ``logger`` prints at ``level`` (True when it cannot tell)."""
    test = getattr(logger, "is_enabled_for", None) or getattr(logger, "isEnabledFor", None)
    return True if test is None else bool(test(level))


def stage_name(event: type[Event]) -> str:
    """The stage an event belongs to (``envrcpt``, ``eom``...), as logs and metrics name it."""
    stage = BY_EVENT.get(event)
    return stage.name if stage is not None else event.__name__.lower()


def verdict_name(verdict: Reply | None, stage: str) -> str:
    """What the MTA does with the message: ``accept`` (Continue at end of message too),
    ``reject``, ``tempfail``, ``discard``, ``shutdown``..."""
    if verdict is None or (verdict.__class__ is Continue and stage == "eom"):
        return "accept"
    return type(verdict).__name__.lower()


def envelope_address(record: EnvFrom | bytes | None) -> str | None:
    """The address of a MAIL record, model or payload, without decoding a model."""
    if record is None:
        return None
    if isinstance(record, bytes):
        # The payload's first string is the address in angle brackets; the log needs no more.
        return record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape").strip("<>")
    return record.address


def count_modification(message: Message, reply: Reply) -> None:
    """Count one modification sent for ``message`` (replacement body packets once)."""
    name = _MODIFICATION_NAMES.get(type(reply).__name__)
    if name is None:
        return
    counts = message.modifications_sent
    if name == "replace_body" and counts.get(name):
        return
    counts[name] = counts.get(name, 0) + 1


def log_message(ctx: Context[Any, Any], stage: str, verdict: Reply | None, outcome: str) -> None:
    """Log the ``message`` line of ``ctx.message``, which ends now at ``stage`` with
    ``verdict``: ``outcome`` is its :func:`verdict_name`, or ``abort`` when the message
    ended without one."""
    message = ctx.message
    fields: dict[str, Any] = {
        "queue_id": message.queue_id,
        "sender": envelope_address(message.sender_record),
        "recipients": len(message.recipient_records),
        "refused": message.refused_recipients,
        "verdict": outcome,
        "stage": stage,
    }
    if isinstance(verdict, Reject | TempFail) and verdict.code is not None:
        fields["code"] = verdict.code
        if verdict.xcode:
            fields["xcode"] = verdict.xcode
    sent = message.modifications_sent
    if sent:
        if len(sent) == 1:  # (most messages: one kind, mostly a header added)
            [(name, count)] = sent.items()
            fields["modifications"] = f"{name}:{count}"
        else:
            fields["modifications"] = ",".join(
                [f"{name}:{count}" for name, count in sorted(sent.items())]
            )
    fields["body_bytes"] = message.body_size
    fields["handler_ms"] = _milliseconds(message.handler_seconds)
    if message.started:
        fields["duration_ms"] = _milliseconds(time.perf_counter() - message.started)
    # (The session's logger: binding one with this queue id would cost more than the line.)
    ctx.session_log.info("message", **fields)


def log_connection(ctx: Context[Any, Any], messages: int, started: float) -> None:
    """Log the ``connection_closed`` line of a connection (or of one session on it)."""
    ctx.session_log.info(
        "connection_closed",
        messages=messages,
        duration_ms=_milliseconds(time.monotonic() - started),
    )


def log_event(ctx: Context[Any, Any], stage: str, replies: bytes, seconds: float) -> None:
    """Log the debug ``event`` line: the stage, the reply letters sent, the time taken."""
    ctx.log.debug("event", stage=stage, replies=_reply_letters(replies), ms=_milliseconds(seconds))


def _milliseconds(seconds: float) -> float:
    """``seconds`` in milliseconds to the microsecond (``round(x, 3)`` costs several times
    more: it rounds through the decimal digits)."""
    return round(seconds * 1_000_000) / 1000


def _reply_letters(packets: bytes) -> str:
    letters = []
    at = 0
    while at + 5 <= len(packets):
        length = int.from_bytes(packets[at : at + 4], "big")
        letters.append(chr(packets[at + 4]))
        at += 4 + length
    return "".join(letters) or "-"
