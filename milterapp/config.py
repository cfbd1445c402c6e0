"""The options of an App (:class:`AppConfig`), validated as one model when the App is made.

The server reads some of them too (the fallback reply, the progress interval, whether whole
messages are kept), which is why they live below both the App and the server.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
