"""An upstream milter's settings, and how it fails.

:class:`UpstreamOptions` says where an upstream listens, its deadlines and its failure policy
(what ``app.use_milter()`` and ``milterapp chain --milter`` are given);
:class:`UpstreamFailure` is every way a conversation with it can fail, by kind.
"""

from __future__ import annotations

import re
from typing import Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

from milterapp.errors import MilterError
from milterapp.spec import ConnectionSpec

__all__ = ["FailureKind", "FailurePolicy", "UpstreamFailure", "UpstreamOptions"]

#: What the chain answers for a message when its upstream fails.
FailurePolicy: TypeAlias = Literal["tempfail", "accept", "reject"]
FailureKind: TypeAlias = Literal["unreachable", "negotiation", "timeout", "protocol", "closed"]

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


class UpstreamOptions(BaseModel):
    """Where an upstream milter listens, its deadlines in seconds, and the policy on failure.

    ``command_timeout`` stays below Sendmail's 10 s per reply, so that our MTA does not give
    up on us before we give up on the upstream.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    spec: ConnectionSpec
    connect_timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    command_timeout: float = Field(default=8.0, gt=0, allow_inf_nan=False)
    eom_timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    on_failure: FailurePolicy = "tempfail"

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"name {name!r} must be non-empty letters, digits, '_', '.' or '-'")
        return name

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, spec: object) -> object:
        # ConnectionSpecError is a ValueError: pydantic reports it under the field "spec".
        return ConnectionSpec.parse(spec) if isinstance(spec, str) else spec


class UpstreamFailure(MilterError):
    """The upstream milter failed; ``str()`` is ``upstream NAME: DETAIL``.

    Attributes:
        name: the upstream's name (:attr:`UpstreamOptions.name`).
        kind: ``unreachable`` (no connection), ``negotiation`` (connected, but no valid
            negotiation reply), ``timeout`` (a deadline passed), ``protocol`` (an invalid
            reply) or ``closed`` (the upstream closed or reset the connection).
        detail: what happened, in plain words.
    """

    def __init__(self, name: str, kind: FailureKind, detail: str) -> None:
        super().__init__(f"upstream {name}: {detail}")
        self.name = name
        self.kind: FailureKind = kind
        self.detail = detail
