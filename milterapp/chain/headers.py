"""A message's header list as an MTA edits it: the model a chain keeps at end of message.

Each party of a chain is shown the headers as the MTA would show them had it applied the
edits of the parties before it, and its own edits (indexes included) must mean what they
would mean to the MTA. :class:`HeaderList` holds the MTA's list and edits it by the MTA's
rules (docs/protocol-reference.md §6): :data:`POSTFIX_RULES` and :data:`SENDMAIL_RULES`. The
testing kit's delivery model (:mod:`milterapp.testing.delivery`) uses the same class.

Values are kept as a milter without HDR_LEADSPC sees them: the text after the colon without
the one space the MTA writes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "POSTFIX_RULES",
    "SENDMAIL_RULES",
    "EditRules",
    "HeaderField",
    "HeaderList",
    "HeaderRules",
]


class HeaderRules(Protocol):
    """How an MTA applies header edits (an :class:`EditRules`, or a testing kit profile)."""

    @property
    def deletes_headers(self) -> bool:
        """A deleted header is removed and later indexes shift (Postfix); else it is only
        marked deleted and keeps counting (Sendmail)."""

    @property
    def renames_changed_headers(self) -> bool:
        """A changed header takes the name as the milter spelled it (Postfix)."""

    @property
    def adds_before_same_name(self) -> bool:
        """An added header goes before the first header of that name (Sendmail)."""


@dataclass(frozen=True, slots=True)
class EditRules:
    """One MTA's :class:`HeaderRules`."""

    deletes_headers: bool
    renames_changed_headers: bool
    adds_before_same_name: bool


POSTFIX_RULES: Final = EditRules(
    deletes_headers=True, renames_changed_headers=True, adds_before_same_name=False
)
SENDMAIL_RULES: Final = EditRules(
    deletes_headers=False, renames_changed_headers=False, adds_before_same_name=True
)


@dataclass(slots=True)
class HeaderField:
    """One header of the list."""

    name: str
    value: str
    #: False for the MTA's own headers, which milters never see.
    visible: bool
    #: Sendmail's mark for a deleted header; Postfix removes the field instead.
    deleted: bool = False


class HeaderList:
    """The MTA's header list, edited as ``rules`` say."""

    def __init__(self, rules: HeaderRules, fields: list[HeaderField]) -> None:
        self.rules = rules
        self.fields = fields

    def add(self, name: str, value: str) -> None:
        """Add a header (``smfi_addheader``)."""
        new = HeaderField(name, value, visible=True)
        if self.rules.adds_before_same_name:
            # Sendmail's addheader() links a new field before the first one of that name,
            # deleted ones included (headers.c).
            for position, field in enumerate(self.fields):
                if field.name.lower() == name.lower():
                    self.fields.insert(position, new)
                    return
        self.fields.append(new)

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a header at ``index`` (``smfi_insheader``)."""
        # Index 0 is above the MTA's own Received:, 1 just below it; the index counts the
        # whole list, so Sendmail's deleted (marked) fields count too; past the end appends.
        # Sendmail's list also holds configuration-default headers that are not written out,
        # so there indexes above 1 may land earlier than here (§6).
        self.fields.insert(min(index, len(self.fields)), HeaderField(name, value, visible=True))

    def change(self, index: int, name: str, value: str | None) -> None:
        """Change the ``index``-th visible header called ``name``; None deletes it
        (``smfi_chgheader`` with an empty value)."""
        # 1-based among the fields of that name the milter could see; 0 counts as 1 (§6).
        # Not modelled: Sendmail changes a configuration-default header of that name when no
        # client header matches.
        same = [f for f in self.fields if f.visible and f.name.lower() == name.lower()]
        position = max(index, 1) - 1
        if position >= len(same):
            if value is not None:  # changing a missing occurrence adds it; deleting: no-op
                self.add(name, value)
            return
        target = same[position]
        if value is None:
            if self.rules.deletes_headers:
                self.fields.remove(target)  # later occurrences renumber
            else:
                target.deleted = True  # later occurrences keep their index
            return
        target.value, target.deleted = value, False
        if self.rules.renames_changed_headers:
            target.name = name

    def visible(self) -> list[tuple[str, str]]:
        """The headers a milter is shown, in order."""
        return [(f.name, f.value) for f in self.fields if f.visible and not f.deleted]

    def result(self) -> tuple[tuple[str, str], ...]:
        """Every header the MTA writes out, in order."""
        return tuple((f.name, f.value) for f in self.fields if not f.deleted)
