"""How Postfix and Sendmail behave as milter clients: offer, macros, header quirks.

An :class:`MtaProfile` holds what differs between MTAs and matters to a milter: the
negotiation offer, which macros come before which command and with which values, when the
queue ID is known, how deleted headers renumber. :data:`POSTFIX` (3.7, main.cf defaults) and
:data:`SENDMAIL` (8.17, m4 defaults) are built in; derive others with ``model_copy(update=...)``.

Section numbers refer to the protocol reference (docs/protocol-reference.md). Values that
were read from MTA source but not yet seen from a running MTA are marked as such.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from milterapp.chain.headers import POSTFIX_RULES, SENDMAIL_RULES
from milterapp.constants import DEFAULT_MAX_DATA_SIZE, MacroStage
from milterapp.events import Header, Negotiate, macro_name
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.protocol.stages import STAGES

__all__ = ["POSTFIX", "PROFILES", "SENDMAIL", "MtaProfile", "SessionFacts", "profile"]

#: Every stage letter a macro packet (``D``) can carry: the commands the milter answers.
_STAGE_LETTERS: Final = "".join(stage.commands.decode() for stage in STAGES if not stage.observer)
#: Stage letter of each macro list a milter can request in its negotiation reply (§2).
_REQUEST_LETTER: Final[dict[MacroStage, str]] = {
    stage.macros: stage.commands.decode() for stage in STAGES if stage.macros is not None
}


class SessionFacts(BaseModel):
    """What the MTA knows about an SMTP session; :meth:`MtaProfile.macro_values` reads it.

    Addresses are without angle brackets; ``sender`` is ``""`` for the null sender and None
    before MAIL. ``client_name`` is the verified name (``[address]`` when there is none).
    ``accepted_recipients`` counts the recipients accepted before the current command (Postfix
    knows the queue ID only after the first). ``extra`` adds or overrides macros per stage
    letter, names as the MTA sends them: ``{"M": {"{auth_ssf}": "256"}}``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hostname: str = "mx.example.net"
    daemon_name: str | None = None  # None: the profile's own (Postfix smtpd, Sendmail MTA)
    daemon_addr: str = "198.51.100.25"
    daemon_port: int = Field(default=25, ge=0, le=65535)
    client_address: str = "192.0.2.10"
    client_name: str = "client.example"
    client_port: int = Field(default=49974, ge=0, le=65535)
    helo: str = "client.example"
    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    accepted_recipients: int = Field(default=0, ge=0)
    auth_type: str | None = None
    auth_authen: str | None = None
    message_id: str | None = None
    extra: dict[str, dict[str, str]] = Field(default_factory=dict)


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _domain(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rpartition("@")[2]


class MtaProfile(BaseModel):
    """One MTA's behaviour as a milter client.

    Attributes:
        name: short name (``postfix``, ``sendmail``).
        kind: whose rules compute macro values (``_``, ``{if_addr}``, mailer names).
        version: the MTA's version, as in its ``v`` macro.
        offer: the option negotiation it sends (§2).
        macros: macro names sent by default before each command, by stage letter (§8).
        macro_stage_letters: letters its macro packets use (§3).
        sends_macros_without_values: True: a ``D`` before every event, even when the stage's
            list is empty (Postfix). False: a ``D`` only for a stage with a non-empty list,
            possibly carrying no value (Sendmail, milter.c ``milter_send_macros``).
        abort_after_each_message: sends ``A`` after every message, even after its verdict (§7).
        queue_id_from_rcpt: the ``i`` macro is known only after the first accepted RCPT.
        deletes_headers: a deleted header is removed and later indexes shift (Postfix); else it
            is only marked deleted and keeps counting (Sendmail) (§6).
        renames_changed_headers: a changed header takes the name as the milter spelled it
            (Postfix writes a new header line); else only its value changes (Sendmail).
        adds_before_same_name: an added header goes before the first header of the same name
            rather than at the end (Sendmail headers.c ``addheader``; source reading only).
        consecutive_body_replacement: body replacement packets must not be interleaved with
            other modifications (Postfix fails the milter, §4).
        body_chunk_size: largest body chunk it sends (§1).
        daemon_name: its default ``{daemon_name}``.
        ipv6_prefix: written before IPv6 addresses in the ``_`` macro.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["postfix", "sendmail"]
    version: str
    offer: Negotiate = DEFAULT_OFFER
    macros: dict[str, tuple[str, ...]]
    macro_stage_letters: str
    sends_macros_without_values: bool
    abort_after_each_message: bool
    queue_id_from_rcpt: bool
    deletes_headers: bool
    renames_changed_headers: bool
    adds_before_same_name: bool
    consecutive_body_replacement: bool
    body_chunk_size: int = DEFAULT_MAX_DATA_SIZE
    daemon_name: str
    ipv6_prefix: str = ""

    def sends_macro_packet(self, stage: str) -> bool:
        """Whether a ``D`` packet precedes the command ``stage`` (a letter) by default."""
        _check_stage(stage)
        if stage not in self.macro_stage_letters:
            return False
        return self.sends_macros_without_values or bool(self.macros.get(stage))

    def macro_values(
        self, stage: str, facts: SessionFacts, names: Sequence[str] | None = None
    ) -> dict[str, str]:
        """Return the macros this MTA sends before the command ``stage`` (a letter).

        ``names`` replaces the default list (as a milter's request does); only macros with a
        value are included, then ``facts.extra[stage]`` adds or overrides.
        """
        _check_stage(stage)
        wanted = self.macros.get(stage, ()) if names is None else tuple(names)
        values: dict[str, str] = {}
        for name in wanted:
            value = self._value(name, stage, facts)
            if value is not None:
                values[name] = value
        for name, value in facts.extra.get(stage, {}).items():
            # An override may spell the name with or without braces.
            for existing in [n for n in values if macro_name(n) == macro_name(name)]:
                del values[existing]
            values[name] = value
        return values

    def with_requested_macros(self, requested: Mapping[MacroStage, Sequence[str]]) -> MtaProfile:
        """Return this profile with the macro lists a milter asked for in negotiation (§2).

        Sendmail sends nothing for an empty list; Postfix falls back to its own list
        (unconfirmed, source reading). Postfix also uses the EOH list before each header (``L``)
        and the EOM list before each body chunk (``B``) (§3). Sendmail's reported preference
        for its own EOM list when no EOH list was requested (§8, unconfirmed) is not modelled.
        """
        macros = dict(self.macros)
        for stage, names in requested.items():
            if not names and self.kind == "postfix":
                continue
            letter = _REQUEST_LETTER[MacroStage(stage)]
            macros[letter] = tuple(names)
            if self.kind == "postfix" and letter in "NE":
                macros["L" if letter == "N" else "B"] = tuple(names)
        return self.model_copy(update={"macros": macros})

    def header_for_milter(self, name: str, value: str, leading_space: bool = False) -> Header:
        """Return the ``L`` event this MTA sends for the header line ``name:value``.

        ``value`` is the text after the colon. Without HDR_LEADSPC both MTAs remove exactly
        one leading space (not a tab); folded lines keep ``\\n`` + whitespace, no CR (§3).
        """
        text = value.replace("\r\n", "\n").removesuffix("\n")
        if not leading_space and text.startswith(" "):
            text = text[1:]
        return Header(name=name, value=text, leading_space=leading_space)

    # --- macro values -------------------------------------------------------------------

    def _value(self, name: str, stage: str, facts: SessionFacts) -> str | None:
        key = macro_name(name)
        postfix = self.kind == "postfix"
        if key.startswith("mail_"):
            return self._envelope_value(key[5:], facts.sender, "smtp" if postfix else "esmtp")
        if key.startswith("rcpt_"):
            # Postfix: the recipient domain as a virtual mailbox domain of this MTA
            # (transport virtual, nexthop the domain; trivial-rewrite resolve.c). Sendmail:
            # the esmtp mailer to the domain. Both are plausible choices, not observed.
            mailer = "virtual" if postfix else "esmtp"
            return self._envelope_value(key[5:], facts.recipient, mailer)
        loopback = _is_loopback(facts.daemon_addr)
        if key == "if_name":
            # Sendmail names the interface by its address's PTR; guessed here as the host
            # name, or localhost for loopback (daemon.c getrequests).
            return None if postfix else ("localhost" if loopback else facts.hostname)
        if key == "if_addr":
            # Sendmail leaves {if_addr} undefined on loopback (daemon.c); Postfix has none.
            return None if postfix or loopback else self._ipv6(facts.daemon_addr)
        table: dict[str, str | None] = {
            "j": facts.hostname,
            "s": None if postfix else facts.helo,  # Sendmail's HELO name; Postfix has no s
            "v": f"Postfix {self.version}" if postfix else self.version,
            "_": self._client_info(facts),
            "i": self._queue_id(stage, facts),
            "daemon_name": facts.daemon_name or self.daemon_name,
            "daemon_addr": facts.daemon_addr,
            "daemon_port": str(facts.daemon_port),
            # Both write IPv6 client addresses as IPv6:... here (Postfix: rfc_addr).
            "client_addr": ("IPv6:" if _is_ipv6(facts.client_address) else "")
            + facts.client_address,
            "client_name": facts.client_name,
            "client_ptr": facts.client_name,
            "client_port": str(facts.client_port),
            "auth_type": facts.auth_type,
            "auth_authen": facts.auth_authen,
            # Sendmail: the Message-Id value, leading whitespace stripped (headers.c).
            "msg_id": None if postfix else facts.message_id,
        }
        return table.get(key)

    def _ipv6(self, address: str) -> str:
        return self.ipv6_prefix + address if _is_ipv6(address) else address

    def _client_info(self, facts: SessionFacts) -> str:
        # The "_" macro. Postfix (smtpd_milter.c): "<PTR name> [<address>]", "unknown" when
        # there is no name. Sendmail (daemon.c getauthinfo, no IDENT answer): "<name>
        # [IPv6:<address>]", or just "[<address>]" when the name is unknown. Both append
        # " (may be forged)" when forward and reverse DNS disagree; not modelled.
        unknown = facts.client_name.startswith("[")
        address = self._ipv6(facts.client_address)
        if self.kind == "postfix":
            return f"{'unknown' if unknown else facts.client_name} [{address}]"
        return facts.client_name if unknown else f"{facts.client_name} [{address}]"

    def _queue_id(self, stage: str, facts: SessionFacts) -> str | None:
        # Postfix opens its queue file after the milter saw the first RCPT (smtpd.c rcpt_cmd),
        # so "i" is missing at MAIL and at the first RCPT (§8). Sendmail has it from MAIL on.
        if stage in ("C", "H"):
            return None
        if self.queue_id_from_rcpt:
            if stage == "M":
                return None  # every message gets a new queue file
            known = stage not in ("R", "U") or facts.accepted_recipients > 0
        else:
            known = stage != "U" or facts.sender is not None
        return facts.queue_id if known else None

    @staticmethod
    def _envelope_value(part: str, address: str | None, mailer: str) -> str | None:
        if address is None:
            return None
        if part == "addr":
            return address
        if not address:
            # Null sender: an empty {mail_addr} (Postfix smtpd_milter.c; assumed for Sendmail),
            # host and mailer left undefined (a guess for both MTAs).
            return None
        return {"host": _domain(address), "mailer": mailer}.get(part)


def _check_stage(stage: str) -> None:
    if len(stage) != 1 or stage not in _STAGE_LETTERS:
        raise ValueError(f"stage must be one of {_STAGE_LETTERS!r}, not {stage!r}")


def _names(spelled: str) -> tuple[str, ...]:
    # Lists are written as in main.cf and sendmail.cf: names separated by spaces.
    return tuple(spelled.split())


_TLS_MACROS: Final = _names("{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}")

#: Postfix 3.7 with main.cf defaults and ``milter_protocol = 6`` (§2, §3, §8).
POSTFIX: Final = MtaProfile(
    name="postfix",
    kind="postfix",
    version="3.7.11",
    macros={
        "C": _names("j {daemon_name} {daemon_addr} v _"),
        "H": _TLS_MACROS,
        "M": _names(
            "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"
        ),
        "R": _names("i {rcpt_addr} {rcpt_host} {rcpt_mailer}"),
        # milter_data_macros, milter_end_of_header_macros (N, and L before each header),
        # milter_end_of_data_macros (E, and B before each body chunk).
        **dict.fromkeys("TLNBE", ("i",)),
        "U": (),
    },
    macro_stage_letters="CHMRTLNBEU",
    sends_macros_without_values=True,
    abort_after_each_message=True,
    queue_id_from_rcpt=True,
    **asdict(POSTFIX_RULES),
    consecutive_body_replacement=True,
    daemon_name="smtpd",
)

#: Sendmail 8.17 with the m4 configuration's default milter macros (§2, §3, §8).
SENDMAIL: Final = MtaProfile(
    name="sendmail",
    kind="sendmail",
    version="8.17.1.9",
    macros={
        "C": _names("j _ {daemon_name} {if_name} {if_addr}"),
        "H": _TLS_MACROS,
        "M": _names(
            "i {auth_type} {auth_authen} {auth_ssf} {auth_author} {mail_mailer} {mail_host} "
            "{mail_addr}"
        ),
        "R": _names("{rcpt_mailer} {rcpt_host} {rcpt_addr}"),
        "T": (),
        "N": (),
        "E": ("{msg_id}",),
    },
    macro_stage_letters="CHMRTNE",
    sends_macros_without_values=False,
    abort_after_each_message=False,
    queue_id_from_rcpt=False,
    **asdict(SENDMAIL_RULES),
    consecutive_body_replacement=False,
    daemon_name="MTA",
    ipv6_prefix="IPv6:",
)

#: The built-in profiles by name.
PROFILES: Final[Mapping[str, MtaProfile]] = {"postfix": POSTFIX, "sendmail": SENDMAIL}


def profile(name: Literal["postfix", "sendmail"] | MtaProfile) -> MtaProfile:
    """Return the built-in profile called ``name``, or ``name`` itself if it is a profile."""
    if isinstance(name, MtaProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown MTA {name!r}; choose one of {sorted(PROFILES)}") from None
