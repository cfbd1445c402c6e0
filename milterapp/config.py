"""The options of an App (:class:`AppConfig`), validated as one model when the App is made.

The server reads some of them too (the fallback reply, the progress interval, whether whole
messages are kept), which is why they live below both the App and the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from milterapp.constants import ActionFlag, MacroStage
from milterapp.protocol.stages import BY_NAME, MacroStageName, OptionalEvent
from milterapp.replies import Accept, Continue, Discard, NegotiationReply, Reject, TempFail

__all__ = ["DEFAULT_SPOOL_THRESHOLD", "AppConfig"]

#: Kept bodies up to this size stay in memory; larger ones go to a temporary file.
DEFAULT_SPOOL_THRESHOLD: Final = 1024 * 1024


class AppConfig(BaseModel):
    """Every option of an App, validated when the App is created.

    Attributes:
        fallback: the reply when a handler fails (raises, times out, returns a non-reply).
            TempFail by default: the MTA retries later and no mail passes unchecked.
        handler_timeout: seconds an async handler may run (None: no limit). Keep it below
            the MTA's timeouts (Postfix milter_command_timeout 30 s, Sendmail T=R:10s).
        progress_interval: seconds between progress packets while an end-of-message handler
            runs (Postfix milter_content_timeout is 300 s; Sendmail's T=E is 5 min in all).
        actions: the actions the app needs; None asks for all the MTA offers and requires
            none. When given, negotiation fails if the MTA lacks one of them.
        macros: macro names to ask for, per stage name (``{"envfrom": ["{auth_authen}"]}``).
        no_reply: handled events whose handlers never change the verdict.
        leading_space: header values with their leading whitespace (HDR_LEADSPC).
        rejected_recipients: also see recipients the MTA rejected (RCPT_REJ).
        keep_message: keep sender, recipients, headers and body for end of message.
        spool_threshold: kept bodies above this many bytes go to a temporary file.
        message_state: the class (or any callable without arguments) of each message's
            ``ctx.message.state``: a dataclass or a pydantic model whose fields all have
            defaults. A dict by default.
        connection_state: the same for each connection's ``ctx.state``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fallback: TempFail | Reject | Discard | Accept | Continue = TempFail()
    handler_timeout: float | None = Field(default=25.0, gt=0)
    progress_interval: float = Field(default=10.0, gt=0)
    actions: ActionFlag | None = None
    macros: dict[MacroStageName, tuple[str, ...]] = Field(default_factory=dict)
    no_reply: frozenset[OptionalEvent] = frozenset()
    leading_space: bool = False
    rejected_recipients: bool = False
    keep_message: bool = False
    spool_threshold: int = Field(default=DEFAULT_SPOOL_THRESHOLD, ge=0)
    message_state: Callable[[], Any] = dict
    connection_state: Callable[[], Any] = dict

    @field_validator("message_state", "connection_state")
    @classmethod
    def _check_state(cls, value: Callable[[], Any], info: ValidationInfo) -> Callable[[], Any]:
        # Made once now, so that a class that cannot be made without arguments fails here,
        # not at every message.
        name = getattr(value, "__qualname__", repr(value))
        try:
            value()
        except Exception as exc:  # noqa: BLE001 - whatever it raises, say so in one line
            raise ValueError(
                f"{info.field_name}={name} cannot be made without arguments ({exc}); "
                "give every field a default"
            ) from None
        return value

    @field_validator("macros")
    @classmethod
    def _check_macros(
        cls, value: dict[MacroStageName, tuple[str, ...]]
    ) -> dict[MacroStageName, tuple[str, ...]]:
        NegotiationReply(macros=_by_stage(value))  # one place validates macro names
        return value

    def macro_requests(self) -> dict[MacroStage, tuple[str, ...]]:
        """:attr:`macros` by protocol stage, as negotiation asks for them."""
        return _by_stage(self.macros)

    @property
    def kept_body_threshold(self) -> int | None:
        """Bytes of a kept body held in memory; None when bodies are not kept."""
        return self.spool_threshold if self.keep_message else None


def _by_stage(macros: dict[MacroStageName, tuple[str, ...]]) -> dict[MacroStage, tuple[str, ...]]:
    by_stage: dict[MacroStage, tuple[str, ...]] = {}
    for name, names in macros.items():
        stage = BY_NAME[name].macros
        assert stage is not None  # MacroStageName lists stages with a macro list only
        by_stage[stage] = names
    return by_stage
