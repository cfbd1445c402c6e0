"""How the verdicts of a chain's parties combine, one command at a time, as an MTA's list does.

Postfix, Sendmail, milter manager and Mail::Milter::Chain agree on the rules
(``docs/chaining.md`` has the table): parties are asked in the chain's order, and

- a **restrictive** verdict (Reject, TempFail, Discard, Shutdown) answers the command at
  once: later parties are not asked. At RCPT it refuses that recipient only and the message
  goes on for everyone; elsewhere it ends what the stage's scope ends (the message from MAIL
  on, the connection at CONNECT and HELO).
- **Accept** means that party is done, not that the message is accepted: at CONNECT and HELO
  it is not asked again on this connection, from MAIL to end of message not again for this
  message. The MTA is told Accept only when every party is done.
- **Skip** at a body chunk stops the body for that party; the MTA is told Skip only when no
  party wants more body.
- **Continue** (or no answer) lets the next party be asked.

:class:`Referee` keeps which party is done for what; the chain asks it which parties to ask
(:meth:`Referee.asks`), tells it each answer (:meth:`Referee.hears`), and takes the reply for
the MTA from it (:meth:`Referee.reply`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from milterapp.protocol.stages import BY_NAME
from milterapp.replies import (
    RESTRICTIVE,
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

__all__ = ["Referee"]

_CONTINUE: Final = Continue()
_ACCEPT: Final = Accept()
_SKIP: Final = Skip()
#: Stages at which Accept ends the party's part in the connection (else: in the message).
_CONNECTION_STAGES: Final = frozenset(
    name for name, stage in BY_NAME.items() if stage.scope == "connection"
)


class Referee:
    """The state of a chain's parties on one connection, and the replies it gives the MTA.

    ``names`` are the parties in the chain's order (the app's own handlers among them).
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("a chain needs at least one party")
        self.names = tuple(names)
        self._everyone = tuple(range(len(self.names)))
        self._done_connection: set[int] = set()
        self._done_message: set[int] = set()
        self._skipping_body: set[int] = set()
        self._answer: Verdict | Shutdown | None = None

    def asks(self, stage: str) -> tuple[int, ...]:
        """The parties to ask at ``stage``, in order: those not done (and, for body chunks,
        not skipping the body)."""
        done = self._done_connection | self._done_message
        if stage == "body":
            done = done | self._skipping_body
        if not done:
            return self._everyone  # the usual case: nobody is done
        return tuple(at for at in self._everyone if at not in done)

    def hears(self, stage: str, party: int, verdict: Verdict | Shutdown | None) -> bool:
        """Record ``party``'s answer at ``stage``; True when the command is answered now
        (a restrictive verdict: later parties are not asked)."""
        if isinstance(verdict, RESTRICTIVE):
            self._answer = verdict
            return True
        if isinstance(verdict, Accept):
            if stage in _CONNECTION_STAGES:
                self._done_connection.add(party)
            else:
                self._done_message.add(party)
        elif isinstance(verdict, Skip) and stage == "body":
            self._skipping_body.add(party)
        return False

    def reply(self, stage: str) -> Verdict | Shutdown:
        """The reply to the MTA for the command just asked about, and the state made ready
        for the next one."""
        answer, self._answer = self._answer, None
        if answer is not None:
            if isinstance(answer, Discard) or (
                isinstance(answer, Reject | TempFail | Shutdown) and stage != "envrcpt"
            ):
                self._message_ends()
            return answer
        done = self._done_connection | self._done_message
        if len(done) == len(self.names):
            if stage not in _CONNECTION_STAGES:
                self._message_ends()
            return _ACCEPT
        if stage == "body" and len(done | self._skipping_body) == len(self.names):
            return _SKIP
        if stage == "eom":
            self._message_ends()
        return _CONTINUE

    def drop(self, party: int) -> None:
        """``party`` takes no further part in this connection (it failed, or a condition
        says it does not apply): as if it had accepted at CONNECT."""
        self._done_connection.add(party)

    def drop_from_message(self, party: int) -> None:
        """``party`` takes no further part in the current message."""
        self._done_message.add(party)

    def message_aborted(self) -> None:
        """The MTA aborted the message: every party is asked again for the next one."""
        self._message_ends()

    def _message_ends(self) -> None:
        self._done_message.clear()
        self._skipping_body.clear()
