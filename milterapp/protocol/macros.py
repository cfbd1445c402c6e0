"""Macro values per stage, kept as libmilter keeps them (protocol reference §3).

A new ``D`` packet for a stage replaces that stage's table. When the MTA moves back to an
earlier stage (a new connection, HELO, MAIL or RCPT), the tables of later stages are stale and
are dropped; an abort of an open message drops the per-message ones; a quit drops all. A
message that ended with its verdict keeps its macros visible until the next MAIL, as in
libmilter. Lookups go from the most recently defined stage back, and accept names with or
without braces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from milterapp.events import macro_name
from milterapp.protocol.commands import decode_macros
from milterapp.protocol.payload import cstrings
from milterapp.protocol.stages import MESSAGE_STAGES, SEQUENCE

__all__ = ["MacroTable"]

_MESSAGE_STAGES: Final = frozenset(stage.commands.decode() for stage in MESSAGE_STAGES)
#: The stages after each one, in the order the MTA goes through them.
_LATER: Final = {letter: frozenset(SEQUENCE[at + 1 :]) for at, letter in enumerate(SEQUENCE)}


_MISSING: Final = object()


def _leading(payload: bytes, key: str, braced: str) -> str | None:
    """The value of ``key`` (or ``braced``) in an undecoded ``D`` payload when it is the
    packet's first name and neither spelling occurs again in it, or None (then decode it).

    Postfix and Sendmail send the queue id ``i`` first in its packets, and the server looks
    it up for each message's log line: this reads it in a few steps (each costs about as
    much as decoding a string) instead of decoding the whole packet.
    """
    parts = payload.split(b"\0", 2)
    if len(parts) != 3:
        return None
    name = parts[0][1:].decode("utf-8", "surrogateescape")
    if name != key and name != braced:
        return None
    if parts[2]:
        later = "\0" + parts[2].decode("utf-8", "surrogateescape")
        if f"\0{key}\0" in later or f"\0{braced}\0" in later:
            return None  # named again, or a value that reads as the name: decode
    return parts[1].decode("utf-8", "surrogateescape")


class MacroTable(Mapping[str, str]):
    """Macro values of one connection, looked up by name with or without braces."""

    __slots__ = ("_stages",)

    def __init__(self) -> None:
        # letter -> {name as the MTA sent it: value}, or the D packet's payload until a
        # lookup needs it decoded; insertion order = order of definition. The MTA defines
        # macros far more often than an app looks one up: names keep their braces (lookups
        # try both spellings) and packets are decoded only when looked into.
        self._stages: dict[str, dict[str, str] | bytes] = {}

    def define(self, stage: str, values: Mapping[str, str]) -> None:
        """Replace the table of ``stage`` (a command letter) with ``values``."""
        stages = self._stages
        stages.pop(stage, None)
        stages[stage] = dict(values)

    def define_packet(self, stage: str, payload: bytes) -> None:
        """Replace the table of ``stage`` with the values of a ``D`` packet's payload, which
        the caller has checked has the right shape; it is decoded at the first lookup."""
        stages = self._stages
        stages.pop(stage, None)
        stages[stage] = payload

    def _decoded(self, stage: str) -> dict[str, str]:
        """The table of ``stage`` (which must be defined), decoded if it was not yet.

        Replacing the value of an existing key keeps the order of definition, and is allowed
        while iterating over the keys.
        """
        values = self._stages[stage]
        if isinstance(values, bytes):
            values = self._stages[stage] = decode_macros(values)[1]
        return values

    def _tables(self) -> Iterator[dict[str, str]]:
        """The tables in order of definition, each decoded if it was not yet."""
        for stage in self._stages:
            yield self._decoded(stage)

    def enter(self, command: str) -> None:
        """Drop the tables of stages after ``command``, which the MTA has just sent."""
        later = _LATER.get(command)
        stages = self._stages
        # Usually there are none (each RCPT enters the stage again): one test in C finds out.
        if later is not None and not later.isdisjoint(stages):
            for stage in [stage for stage in stages if stage in later]:
                del stages[stage]

    def reset_message(self) -> None:
        """Drop the tables of the message stages (MAIL onwards) after an abort."""
        for stage in _MESSAGE_STAGES:
            self._stages.pop(stage, None)

    def clear(self) -> None:
        """Drop every table (quit, or a connection reused for a new session)."""
        self._stages.clear()

    def packet(self, letter: str) -> bytes | None:
        """The payload of a ``D`` packet that defines the table of ``letter`` as it is (the
        one received, unless a lookup decoded it); None when the stage has none."""
        values = self._stages.get(letter)
        if values is None or isinstance(values, bytes):
            return values
        return letter.encode("latin-1") + cstrings(
            *(part for item in values.items() for part in item)
        )

    def stage(self, letter: str) -> Mapping[str, str]:
        """Return the values defined for one stage (empty if none), names without braces."""
        if letter not in self._stages:
            return {}
        return {macro_name(name): value for name, value in self._decoded(letter).items()}

    def __getitem__(self, name: str) -> str:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value  # type: ignore[no-any-return]

    def get(self, name: str, default: Any = None) -> Any:
        """The value of ``name`` (with or without braces), or ``default``."""
        key = macro_name(name)
        braced = "{" + key + "}"
        stages = self._stages
        for stage in reversed(stages):  # the newest definition wins
            raw = stages[stage]
            if isinstance(raw, bytes):
                value = _leading(raw, key, braced)
                if value is not None:
                    return value
                values = self._decoded(stage)
            else:
                values = raw
            if key in values:
                return values[key]
            if braced in values:
                return values[braced]
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def as_dict(self) -> dict[str, str]:
        """Return every visible macro, newest definition winning, names without braces."""
        merged: dict[str, str] = {}
        for values in self._tables():
            for name, value in values.items():
                merged[macro_name(name)] = value
        return merged

    def __repr__(self) -> str:
        return f"MacroTable({dict(zip(self._stages, self._tables(), strict=True))!r})"
