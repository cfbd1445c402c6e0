"""The message a chain's parties edit at end of message, one after the other.

:class:`MessageEdits` starts from the message as the MTA gave it and takes each party's
modifications in the chain's order. It keeps two things:

- **What the next party sees**: the headers as the MTA would list them after the edits so
  far (:class:`~milterapp.chain.headers.HeaderList`, by the MTA's rules) and the body as
  last replaced. A later party is replayed that, as Postfix and Sendmail replay the queue
  file to their next milter, so its header indexes mean what they would mean to the MTA.
- **What goes to the MTA**, in this order: the header and recipient edits of every party in
  the chain's order (each relative to what that party saw, which is what the MTA's list is
  once the edits before it are applied), then the sender change (the last one), then the
  body (the last replacement, whole), then the quarantine reason (the last one), just
  before the verdict.

Header values are converted between each party's HDR_LEADSPC choice and the MTA's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from typing import IO, Final

from milterapp.chain.headers import HeaderField, HeaderList, HeaderRules
from milterapp.constants import Command
from milterapp.events import Header
from milterapp.protocol.commands import decode_command
from milterapp.replies import (
    AddHeader,
    ChangeHeader,
    ChangeSender,
    InsertHeader,
    Modification,
    Quarantine,
    ReplaceBody,
)

__all__ = ["MessageEdits"]

_HEADER: Final = ord(Command.HEADER.value)
#: A replaced body stays in memory up to this size, then goes to a temporary file.
_SPOOL_AT: Final = 1 << 20


def _stored(value: str, leading_space: bool) -> str:
    """A header value as the model keeps it (without the one space the MTA writes)."""
    return value.removeprefix(" ") if leading_space else value


class MessageEdits:
    """One message's edits by a chain's parties; see the module docstring.

    Args:
        headers: the headers the MTA sent.
        body: the body as the MTA sent it (read from its start when replayed).
        rules: the MTA's rules for header edits.
        leading_space: whether the MTA's connection negotiated HDR_LEADSPC.
    """

    def __init__(
        self,
        headers: Sequence[Header | bytes],
        body: IO[bytes],
        rules: HeaderRules,
        leading_space: bool,
    ) -> None:
        # The headers as the MTA sent them (models, or packet payloads the server kept): the
        # model of the list is made only when a party edits it, else they are replayed as
        # they came.
        self._received = headers
        self._rules = rules
        self._headers: HeaderList | None = None
        self.body = body
        self.body_replaced = False
        self._mta_leading_space = leading_space
        self._out: list[Modification] = []
        self._sender: ChangeSender | None = None
        self._quarantine: Quarantine | None = None

    @property
    def headers(self) -> HeaderList:
        """The MTA's header list as edited so far."""
        headers = self._headers
        if headers is None:
            mta_leading = self._mta_leading_space
            # The MTA's own Received: heads the list, hidden: insert indexes count it (§6).
            fields = [HeaderField("Received", "", visible=False)]
            for header in self._received:
                if isinstance(header, bytes):
                    event = decode_command(_HEADER, header, leading_space=mta_leading)
                    assert isinstance(event, Header)
                    header = event
                value = _stored(header.value, header.leading_space)
                fields.append(HeaderField(header.name, value, visible=True))
            headers = self._headers = HeaderList(self._rules, fields)
        return headers

    def header_payloads(self, leading_space: bool) -> list[bytes] | None:
        """The headers to show a party, as packet payloads the MTA sent, when nobody edited
        them and the party takes the MTA's leading-space convention (``leading_space``);
        else None (:meth:`visible_headers` then)."""
        if self._headers is not None or leading_space != self._mta_leading_space:
            return None
        return [
            header
            if isinstance(header, bytes)
            else header.raw_name + b"\0" + header.raw_value + b"\0"
            for header in self._received
        ]

    def take(
        self,
        modifications: Iterable[Modification],
        *,
        leading_space: bool,
        shown_later: bool = True,
    ) -> None:
        """Apply one party's modifications (its HDR_LEADSPC choice: ``leading_space``);
        ``shown_later``: a party after it will be shown the message (else its header edits
        only go to the MTA)."""
        new_body: IO[bytes] | None = None
        for modification in modifications:
            if isinstance(modification, ReplaceBody):
                if new_body is None:  # the party's first chunk starts a new body
                    new_body = tempfile.SpooledTemporaryFile(max_size=_SPOOL_AT)  # noqa: SIM115 - closed by close()
                new_body.write(modification.chunk)
            elif isinstance(modification, ChangeSender):
                self._sender = modification
            elif isinstance(modification, Quarantine):
                self._quarantine = modification
            elif isinstance(modification, AddHeader | InsertHeader | ChangeHeader):
                self._edit_header(modification, leading_space, shown_later)
            else:  # recipients: the MTA applies them; parties are not shown them again
                self._out.append(modification)
        if new_body is not None:
            if self.body_replaced:  # (the MTA's own body belongs to the message)
                self.body.close()
            new_body.seek(0)
            self.body, self.body_replaced = new_body, True

    def _edit_header(
        self, edit: AddHeader | InsertHeader | ChangeHeader, leading_space: bool, shown: bool
    ) -> None:
        if shown:
            value = _stored(edit.value, leading_space)
            if isinstance(edit, AddHeader):
                self.headers.add(edit.name, value)
            elif isinstance(edit, InsertHeader):
                self.headers.insert(edit.index, edit.name, value)
            else:
                self.headers.change(edit.index, edit.name, value or None)
        mta = self._mta_leading_space
        if edit.value and leading_space != mta:
            # The MTA writes one space after the colon for a party without HDR_LEADSPC.
            edit = edit.model_copy(
                update={"value": " " + edit.value if mta else edit.value.removeprefix(" ")}
            )
        self._out.append(edit)

    def visible_headers(self) -> list[tuple[str, str]]:
        """The headers the next party is shown."""
        return self.headers.visible()

    def rewind_body(self) -> IO[bytes]:
        """The body the next party is shown, from its start."""
        self.body.seek(0)
        return self.body

    def for_mta(self) -> tuple[list[Modification], IO[bytes] | None, Quarantine | None]:
        """The header, recipient and sender edits in order; the new body if one was made;
        the quarantine."""
        out = list(self._out)
        if self._sender is not None:
            out.append(self._sender)
        body = self.rewind_body() if self.body_replaced else None
        return out, body, self._quarantine

    def close(self) -> None:
        """Release the body (a replaced one's temporary file)."""
        if self.body_replaced:
            self.body.close()
