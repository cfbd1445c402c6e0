"""Show what happened to a message: per-stage answers, the verdict, the delivered changes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from milterapp.testing.client import MessageResult
from milterapp.testing.delivery import DeliveredMessage, apply, parse_message, unified_diff
from milterapp.testing.profiles import POSTFIX, MtaProfile

__all__ = ["describe_result", "print_result", "result_as_json"]


def _original(
    result: MessageResult, data: bytes, sender: str, profile: MtaProfile = POSTFIX
) -> DeliveredMessage:
    """The message as the MTA would deliver it without the milter's changes."""
    headers, body = parse_message(data)
    return apply(
        [],
        sender=sender,
        recipients=list(result.recipients),
        headers=headers,
        body=body,
        profile=profile,
    )


def describe_result(result: MessageResult, data: bytes, *, sender: str) -> list[str]:
    """Lines for a person: each stage's answer, the verdict, and a diff of the delivery."""
    lines = []
    for reply in result.replies:
        answer = reply.answer
        lines.append(f"{reply.stage:<8} {answer.verdict!r}")
        lines.extend(f"         {modification!r}" for modification in answer.modifications)
        if answer.progress:
            lines.append(f"         ({answer.progress} progress packets)")
    lines.append(f"verdict  {type(result.verdict).__name__} at {result.stage}")
    if result.delivered is None:
        lines.append("the message is not delivered")
        return lines
    if result.delivered.quarantine:
        lines.append(f"quarantined: {result.delivered.quarantine}")
    diff = unified_diff(_original(result, data, sender), result.delivered)
    lines.append("delivered unchanged" if not diff else "delivered with these changes:")
    lines.extend(diff.splitlines())
    return lines


def result_as_json(result: MessageResult, data: bytes, *, sender: str) -> dict[str, Any]:
    """The same as a JSON-ready dict, for machines."""
    return {
        "verdict": type(result.verdict).__name__,
        "verdict_detail": result.verdict.model_dump(),
        "stage": result.stage,
        "replies": [
            {
                "stage": reply.stage,
                "verdict": repr(reply.answer.verdict),
                "modifications": [
                    {"type": type(m).__name__, **m.model_dump(mode="json")}
                    for m in reply.answer.modifications
                ],
                "progress": reply.answer.progress,
            }
            for reply in result.replies
        ],
        "recipients": {rcpt: type(v).__name__ for rcpt, v in result.recipients.items()},
        "delivered": None
        if result.delivered is None
        else {
            "sender": result.delivered.sender,
            "recipients": list(result.delivered.recipients),
            "quarantine": result.delivered.quarantine,
            "diff": unified_diff(_original(result, data, sender), result.delivered),
        },
    }


def print_result(
    result: MessageResult,
    data: bytes,
    *,
    sender: str,
    as_json: bool = False,
    write: Callable[[str], object] = print,
) -> None:
    """Print :func:`describe_result` lines, or the JSON form."""
    if as_json:
        write(json.dumps(result_as_json(result, data, sender=sender), indent=2))
        return
    for line in describe_result(result, data, sender=sender):
        write(line)
