"""Values the MTA passes as text: wire text (decoded with ``surrogateescape``), macro names,
SMTP paths and ESMTP parameters. :mod:`milterapp.events` builds on them and re-exports them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from pydantic import BaseModel, ConfigDict

__all__ = ["EsmtpArgs", "decode_text", "encode_text", "macro_name", "strip_brackets"]


def decode_text(raw: bytes) -> str:
    """Decode wire text as UTF-8, keeping undecodable bytes as surrogates (never raises)."""
    return raw.decode("utf-8", "surrogateescape")


def encode_text(text: str) -> bytes:
    """Encode text for the wire; the inverse of :func:`decode_text`."""
    return text.encode("utf-8", "surrogateescape")


def macro_name(name: str) -> str:
    """Return a macro name without braces: ``{client_addr}`` and ``client_addr`` are one name."""
    if len(name) > 2 and name[0] == "{" and name[-1] == "}":
        return name[1:-1]
    return name


class EsmtpArgs(BaseModel):
    """ESMTP parameters of MAIL or RCPT, in order; keyword lookup is case-insensitive.

    A parameter without ``=`` (``SMTPUTF8``) has the value None.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, args: list[str] | tuple[str, ...]) -> EsmtpArgs:
        """Build from ``KEY=VALUE`` / ``KEY`` strings as the MTA sends them."""
        if not args and cls is EsmtpArgs:
            return _NO_ARGS  # the usual RCPT: frozen, so one instance serves all
        items = []
        for arg in args:
            key, sep, value = arg.partition("=")
            items.append((key, value if sep else None))
        return cls(items=tuple(items))

    def get(self, keyword: str, default: str | None = None) -> str | None:
        """Return the value of the first parameter named ``keyword`` (any case)."""
        wanted = keyword.upper()
        for key, value in self.items:
            if key.upper() == wanted:
                return value
        return default

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and any(
            key.upper() == keyword.upper() for key, _ in self.items
        )

    def __iter__(self) -> Iterator[tuple[str, str | None]]:  # type: ignore[override]
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def as_strings(self) -> list[str]:
        """Return the parameters as the MTA sent them (``KEY=VALUE`` or ``KEY``)."""
        return [key if value is None else f"{key}={value}" for key, value in self.items]

    def as_dict(self) -> Mapping[str, str | None]:
        """Return ``{KEYWORD: value}`` with upper-case keywords (the first of duplicates)."""
        result: dict[str, str | None] = {}
        for key, value in self.items:
            result.setdefault(key.upper(), value)
        return result


_NO_ARGS: Final = EsmtpArgs()


def strip_brackets(raw: str) -> str:
    """Return an SMTP path without surrounding whitespace and angle brackets."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == "<" and raw[-1] == ">":
        return raw[1:-1]
    return raw
