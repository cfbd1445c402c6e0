"""Byte-exact wire vectors for the codec tests, written by hand from the protocol reference.

This is a data module, not a test module. Every packet below was written from
``/work/shared/milter-protocol.md`` (§1 framing, §3 commands, §4 responses, §5 reply codes,
§11 worked examples), never produced by running the codec: the length prefixes were counted by
hand, and the comment next to each one shows the count (``len`` = payload + 1 command byte).

``COMMAND_VECTORS``: ``(id, wire_bytes, expected_event, decode_kwargs)``; ``decode_kwargs`` go
to :func:`~milterapp.protocol.codec.decode_command`.

``RESPONSE_VECTORS``: ``(id, wire_bytes, expected_reply, encode_kwargs)``; ``encode_kwargs`` go
to :func:`~milterapp.protocol.codec.encode_response`.

Vectors whose ids are in ``DECODE_ONLY_COMMANDS`` decode to the model but the model encodes to
other (equivalent) bytes; those in ``ENCODE_ONLY_RESPONSES`` encode to several packets, so
decoding them gives several models.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    EsmtpArgs,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
    decode_text,
)
from milterapp.replies import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    NegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)

__all__ = [
    "COMMAND_VECTORS",
    "DECODE_ONLY_COMMANDS",
    "ENCODE_ONLY_RESPONSES",
    "FULL_BODY_CHUNK",
    "RESPONSE_VECTORS",
]

#: 65535 bytes (the largest body chunk, §1): 255 times 0..255, then 0..254.
FULL_BODY_CHUNK: Final = bytes(range(256)) * 255 + bytes(range(255))

CommandVector = tuple[str, bytes, Event, dict[str, Any]]
ResponseVector = tuple[str, bytes, Reply, dict[str, Any]]

COMMAND_VECTORS: Final[list[CommandVector]] = [
    # ---- O: option negotiation, exactly 12 bytes (§2) ------------------------------------
    (
        # §11: version 6, actions 0x1FF, protocol 0x1FFFFF. len = 1 + 12 = 13.
        "optneg-v6-section11",
        bytes.fromhex("0000000d 4f 00000006 000001ff 001fffff"),
        Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL),
        {},
    ),
    (
        # Postfix with milter_protocol = 2: version 2, actions 0x1FF, protocol 0x7F.
        "optneg-postfix-v2",
        bytes.fromhex("0000000d 4f 00000002 000001ff 0000007f"),
        Negotiate(version=2, actions=ActionFlag.ALL, protocol=ProtocolFlag.V2),
        {},
    ),
    (
        # Sendmail with Milter.maxdatasize 256K: protocol 0x1FFFFF | MDS_256K (0x10000000).
        "optneg-sendmail-mds256k",
        bytes.fromhex("0000000d 4f 00000006 000001ff 101fffff"),
        Negotiate(
            version=6,
            actions=ActionFlag.ALL,
            protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K,
        ),
        {},
    ),
    # ---- D: macros ----------------------------------------------------------------------
    (
        # §11: "C" + "j\0" (2) + "mx.example.net\0" (15) + "{daemon_name}\0" (14)
        # + "smtpd\0" (6) = 38; len 39 = 0x27.
        "macro-connect-section11",
        bytes.fromhex(
            "00000027 44 43 6a00 6d782e6578616d706c652e6e657400"
            "7b6461656d6f6e5f6e616d657d00 736d74706400"
        ),
        Macros(stage="C", values={"j": "mx.example.net", "{daemon_name}": "smtpd"}),
        {},
    ),
    (
        # Postfix sends a D for the EOH stage even with no macro value: just the letter.
        "macro-postfix-letter-only",
        bytes.fromhex("00000002 44 4c"),
        Macros(stage="L", values={}),
        {},
    ),
    (
        # Postfix's EOM list: "B" + "i\0" (2) + "A1B2C3D4E5\0" (11) = 14; len 15.
        "macro-eom-stage-b",
        b"\x00\x00\x00\x0f" + b"D" + b"B" + b"i\x00" + b"A1B2C3D4E5\x00",
        Macros(stage="B", values={"i": "A1B2C3D4E5"}),
        {},
    ),
    # ---- C: connect ---------------------------------------------------------------------
    (
        # §11: "mail.example.com\0" (17) + "4" + port 0xc336 (2) + "192.0.2.10\0" (11) = 31.
        "connect-ipv4-section11",
        bytes.fromhex(
            "00000020 43 6d61696c2e6578616d706c652e636f6d00 34 c336 3139322e302e322e313000"
        ),
        Connect(
            hostname="mail.example.com",
            family=AddressFamily.INET,
            port=49974,
            address=ipaddress.IPv4Address("192.0.2.10"),
        ),
        {},
    ),
    (
        # Postfix's bare IPv6: 17 + "6" + port 54321 = 0xd431 (2) + "2001:db8::1\0" (12) = 32.
        "connect-ipv6-bare",
        b"\x00\x00\x00\x21"
        + b"C"
        + b"mail.example.com\x00"
        + b"6"
        + b"\xd4\x31"
        + b"2001:db8::1\x00",
        Connect(
            hostname="mail.example.com",
            family=AddressFamily.INET6,
            port=54321,
            address=ipaddress.IPv6Address("2001:db8::1"),
        ),
        {},
    ),
    (
        # Sendmail's prefixed IPv6: 17 + 1 + 2 + "IPv6:2001:db8::1\0" (17) = 37; len 38.
        # Decodes to the bare address, so it does not encode back to these bytes.
        "connect-ipv6-sendmail-prefix",
        b"\x00\x00\x00\x26"
        + b"C"
        + b"mail.example.com\x00"
        + b"6"
        + b"\xd4\x31"
        + b"IPv6:2001:db8::1\x00",
        Connect(
            hostname="mail.example.com",
            family=AddressFamily.INET6,
            port=54321,
            address=ipaddress.IPv6Address("2001:db8::1"),
        ),
        {},
    ),
    (
        # Unix socket: "localhost\0" (10) + "L" + port 0 (2) + "/var/run/smtp.sock\0" (19) = 32.
        "connect-unix",
        b"\x00\x00\x00\x21"
        + b"C"
        + b"localhost\x00"
        + b"L"
        + b"\x00\x00"
        + b"/var/run/smtp.sock\x00",
        Connect(
            hostname="localhost",
            family=AddressFamily.UNIX,
            port=0,
            address="/var/run/smtp.sock",
        ),
        {},
    ),
    (
        # Unknown family: "unknown\0" (8) + "U" and nothing more = 9; len 10.
        "connect-unknown-family",
        b"\x00\x00\x00\x0a" + b"C" + b"unknown\x00" + b"U",
        Connect(hostname="unknown", family=AddressFamily.UNKNOWN),
        {},
    ),
    # ---- H: helo ------------------------------------------------------------------------
    (
        # "mail.example.com\0" = 17; len 18.
        "helo",
        b"\x00\x00\x00\x12" + b"H" + b"mail.example.com\x00",
        Helo(name="mail.example.com"),
        {},
    ),
    # ---- M: mail ------------------------------------------------------------------------
    (
        # §11: "<alice@example.org>\0" (20) + "SIZE=1024\0" (10) = 30; len 31 = 0x1f.
        "mail-section11",
        bytes.fromhex("0000001f 4d 3c616c696365406578616d706c652e6f72673e00 53495a453d3130323400"),
        EnvFrom(
            address="alice@example.org",
            raw="<alice@example.org>",
            args=EsmtpArgs(items=(("SIZE", "1024"),)),
        ),
        {},
    ),
    (
        # Null sender: "<>\0" = 3; len 4.
        "mail-null-sender",
        b"\x00\x00\x00\x04" + b"M" + b"<>\x00",
        EnvFrom(address="", raw="<>"),
        {},
    ),
    (
        # "<bob@example.com>\0" (18) + "SIZE=1234\0" (10) + "BODY=8BITMIME\0" (14)
        # + "SMTPUTF8\0" (9) + "RET=HDRS\0" (9) = 60; len 61 = 0x3d.
        "mail-several-args",
        b"\x00\x00\x00\x3d"
        + b"M"
        + b"<bob@example.com>\x00"
        + b"SIZE=1234\x00"
        + b"BODY=8BITMIME\x00"
        + b"SMTPUTF8\x00"
        + b"RET=HDRS\x00",
        EnvFrom(
            address="bob@example.com",
            raw="<bob@example.com>",
            args=EsmtpArgs(
                items=(
                    ("SIZE", "1234"),
                    ("BODY", "8BITMIME"),
                    ("SMTPUTF8", None),
                    ("RET", "HDRS"),
                )
            ),
        ),
        {},
    ),
    # ---- R: rcpt ------------------------------------------------------------------------
    (
        # "<dave@example.org>\0" = 19; len 20.
        "rcpt",
        b"\x00\x00\x00\x14" + b"R" + b"<dave@example.org>\x00",
        EnvRcpt(address="dave@example.org", raw="<dave@example.org>"),
        {},
    ),
    (
        # "<carol@example.net>\0" (20) + "NOTIFY=SUCCESS,FAILURE\0" (23)
        # + "ORCPT=rfc822;carol@example.net\0" (31) = 74; len 75 = 0x4b.
        "rcpt-with-dsn-args",
        b"\x00\x00\x00\x4b"
        + b"R"
        + b"<carol@example.net>\x00"
        + b"NOTIFY=SUCCESS,FAILURE\x00"
        + b"ORCPT=rfc822;carol@example.net\x00",
        EnvRcpt(
            address="carol@example.net",
            raw="<carol@example.net>",
            args=EsmtpArgs(
                items=(("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;carol@example.net"))
            ),
        ),
        {},
    ),
    # ---- T: data ------------------------------------------------------------------------
    ("data", bytes.fromhex("00000001 54"), Data(), {}),
    # ---- L: header ----------------------------------------------------------------------
    (
        # "Subject\0" (8) + "Hello world\0" (12) = 20; len 21.
        "header-simple",
        b"\x00\x00\x00\x15" + b"L" + b"Subject\x00" + b"Hello world\x00",
        Header(name="Subject", value="Hello world"),
        {},
    ),
    (
        # Empty value, "Name\0\0": "X-Empty\0" (8) + "\0" (1) = 9; len 10.
        "header-empty-value",
        b"\x00\x00\x00\x0a" + b"L" + b"X-Empty\x00" + b"\x00",
        Header(name="X-Empty", value=""),
        {},
    ),
    (
        # Folded: "Received\0" (9) + "from a.example" (14) + "\n\t" (2) + "by b.example" (12)
        # + "\0" = 38; len 39 = 0x27.
        "header-folded",
        b"\x00\x00\x00\x27" + b"L" + b"Received\x00" + b"from a.example\n\tby b.example\x00",
        Header(name="Received", value="from a.example\n\tby b.example"),
        {},
    ),
    (
        # Latin-1 bytes, not UTF-8: "Subject\0" (8) + "caf\xe9 \xff\0" (7) = 15; len 16.
        "header-non-utf8-value",
        b"\x00\x00\x00\x10" + b"L" + b"Subject\x00" + b"caf\xe9 \xff\x00",
        Header(name="Subject", value=decode_text(b"caf\xe9 \xff")),
        {},
    ),
    (
        # HDR_LEADSPC negotiated: the value keeps its leading space.
        # "X-Lead\0" (7) + " x\0" (3) = 10; len 11.
        "header-leading-space",
        b"\x00\x00\x00\x0b" + b"L" + b"X-Lead\x00" + b" x\x00",
        Header(name="X-Lead", value=" x", leading_space=True),
        {"leading_space": True},
    ),
    # ---- N: end of headers --------------------------------------------------------------
    ("eoh", bytes.fromhex("00000001 4e"), EndOfHeaders(), {}),
    # ---- B: body ------------------------------------------------------------------------
    (
        # "Hello\r\n" = 7; len 8.
        "body-small",
        b"\x00\x00\x00\x08" + b"B" + b"Hello\r\n",
        Body(chunk=b"Hello\r\n"),
        {},
    ),
    (
        # The largest chunk: 65535 bytes; len 65536 = 0x00010000 (§1).
        "body-full-chunk",
        b"\x00\x01\x00\x00" + b"B" + FULL_BODY_CHUNK,
        Body(chunk=FULL_BODY_CHUNK),
        {},
    ),
    # ---- E: end of message --------------------------------------------------------------
    ("eom-empty-section11", bytes.fromhex("00000001 45"), EndOfMessage(), {}),
    (
        # libmilter accepts data in E as a last body chunk: "tail\r\n" = 6; len 7.
        "eom-with-data",
        b"\x00\x00\x00\x07" + b"E" + b"tail\r\n",
        EndOfMessage(chunk=b"tail\r\n"),
        {},
    ),
    # ---- U: unknown SMTP command --------------------------------------------------------
    (
        # "XCLIENT NAME=foo\0" = 17; len 18.
        "unknown",
        b"\x00\x00\x00\x12" + b"U" + b"XCLIENT NAME=foo\x00",
        Unknown(line="XCLIENT NAME=foo"),
        {},
    ),
    # ---- A, Q, K: no payload ------------------------------------------------------------
    ("abort", bytes.fromhex("00000001 41"), Abort(), {}),
    ("quit", bytes.fromhex("00000001 51"), Quit(), {}),
    ("quit-nc", bytes.fromhex("00000001 4b"), QuitNoClose(), {}),
]

#: Vectors that decode to their model, which encodes to other bytes.
DECODE_ONLY_COMMANDS: Final = frozenset({"connect-ipv6-sendmail-prefix"})

RESPONSE_VECTORS: Final[list[ResponseVector]] = [
    # ---- O: negotiation reply -----------------------------------------------------------
    (
        # §11: 12 bytes + stage 2 (4) + "{auth_authen} i\0" (16) = 32; len 33 = 0x21.
        "optneg-reply-section11",
        bytes.fromhex(
            "00000021 4f 00000006 00000111 00000582 00000002 7b617574685f61757468656e7d206900"
        ),
        NegotiationReply(
            version=6,
            actions=ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.SETSYMLIST,
            protocol=(
                ProtocolFlag.NOHELO
                | ProtocolFlag.NR_HDR
                | ProtocolFlag.NOUNKNOWN
                | ProtocolFlag.SKIP
            ),
            macros={MacroStage.ENVFROM: ("{auth_authen}", "i")},
        ),
        {},
    ),
    (
        # Lists go on the wire sorted by stage number: CONNECT 0, EOM 5, EOH 6.
        # 12 + (4 + "j {daemon_name}\0" 16) + (4 + "{msg_id} i\0" 11) + (4 + "i\0" 2) = 53;
        # len 54 = 0x36. Actions ADDHDRS|SETSYMLIST = 0x101, protocol NOUNKNOWN|NODATA = 0x300.
        "optneg-reply-stages-sorted",
        bytes.fromhex("00000036 4f 00000006 00000101 00000300")
        + bytes.fromhex("00000000")
        + b"j {daemon_name}\x00"
        + bytes.fromhex("00000005")
        + b"{msg_id} i\x00"
        + bytes.fromhex("00000006")
        + b"i\x00",
        NegotiationReply(
            version=6,
            actions=ActionFlag.ADDHDRS | ActionFlag.SETSYMLIST,
            protocol=ProtocolFlag.NOUNKNOWN | ProtocolFlag.NODATA,
            macros={
                MacroStage.EOH: ("i",),
                MacroStage.CONNECT: ("j", "{daemon_name}"),
                MacroStage.EOM: ("{msg_id}", "i"),
            },
        ),
        {},
    ),
    (
        # An empty list asks for no macros at DATA: 12 + 4 + "\0" = 17; len 18 = 0x12.
        "optneg-reply-empty-list",
        bytes.fromhex("00000012 4f 00000002 00000100 00000000 00000004 00"),
        NegotiationReply(
            version=2,
            actions=ActionFlag.SETSYMLIST,
            protocol=ProtocolFlag.NONE,
            macros={MacroStage.DATA: ()},
        ),
        {},
    ),
    # ---- verdicts and other replies without payload --------------------------------------
    ("continue-section11", bytes.fromhex("00000001 63"), Continue(), {}),
    ("accept", bytes.fromhex("00000001 61"), Accept(), {}),
    ("reject", bytes.fromhex("00000001 72"), Reject(), {}),
    ("tempfail", bytes.fromhex("00000001 74"), TempFail(), {}),
    ("discard", bytes.fromhex("00000001 64"), Discard(), {}),
    ("skip", bytes.fromhex("00000001 73"), Skip(), {}),
    ("progress", bytes.fromhex("00000001 70"), Progress(), {}),
    ("shutdown", bytes.fromhex("00000001 34"), Shutdown(), {}),
    # ---- y: reply code ------------------------------------------------------------------
    (
        # §11: "550 5.7.1 Message rejected\0" = 27; len 28 = 0x1c.
        "replycode-section11",
        bytes.fromhex("0000001c 79 35353020352e372e31204d6573736167652072656a656374656400"),
        Reject(code=550, xcode="5.7.1", text="Message rejected"),
        {},
    ),
    (
        # §11: "550-5.7.1 Line one" (18) + CRLF (2) + "550 5.7.1 Line two" (18) + NUL = 39;
        # len 40 = 0x28.
        "replycode-two-lines-section11",
        bytes.fromhex(
            "00000028 79 3535302d352e372e31204c696e65206f6e650d0a"
            "35353020352e372e31204c696e652074776f00"
        ),
        Reject(code=550, xcode="5.7.1", text="Line one\nLine two"),
        {},
    ),
    (
        # "%" goes on the wire as "%%": "550 100%% spam\0" = 15; len 16.
        "replycode-percent",
        b"\x00\x00\x00\x10" + b"y" + b"550 100%% spam\x00",
        Reject(code=550, text="100% spam"),
        {},
    ),
    (
        # "421 4.7.0 Service shutting down\0" = 32; len 33 = 0x21.
        "replycode-421",
        b"\x00\x00\x00\x21" + b"y" + b"421 4.7.0 Service shutting down\x00",
        TempFail(code=421, xcode="4.7.0", text="Service shutting down"),
        {},
    ),
    (
        # Text only: the default 451. "451 try later\0" = 14; len 15.
        "replycode-tempfail-default-code",
        b"\x00\x00\x00\x0f" + b"y" + b"451 try later\x00",
        TempFail(code=451, text="try later"),
        {},
    ),
    # ---- header edits -------------------------------------------------------------------
    (
        # §11: "X-Spam-Flag\0" (12) + "YES\0" (4) = 16; len 17 = 0x11.
        "addheader-section11",
        bytes.fromhex("00000011 68 582d5370616d2d466c616700 59455300"),
        AddHeader(name="X-Spam-Flag", value="YES"),
        {},
    ),
    (
        # index 0 (4) + "X-First\0" (8) + "1\0" (2) = 14; len 15.
        "insheader-index-0",
        b"\x00\x00\x00\x0f" + b"i" + b"\x00\x00\x00\x00" + b"X-First\x00" + b"1\x00",
        InsertHeader(index=0, name="X-First", value="1"),
        {},
    ),
    (
        # Delete the 2nd X-Spam: index 2 (4) + "X-Spam\0" (7) + "\0" (1) = 12; len 13.
        "chgheader-index-2-delete",
        b"\x00\x00\x00\x0d" + b"m" + b"\x00\x00\x00\x02" + b"X-Spam\x00" + b"\x00",
        ChangeHeader(index=2, name="X-Spam", value=""),
        {},
    ),
    (
        # index 1 (4) + "Subject\0" (8) + "[SPAM] hi\0" (10) = 22; len 23.
        "chgheader-index-1-value",
        b"\x00\x00\x00\x17" + b"m" + b"\x00\x00\x00\x01" + b"Subject\x00" + b"[SPAM] hi\x00",
        ChangeHeader(index=1, name="Subject", value="[SPAM] hi"),
        {},
    ),
    # ---- recipients and sender ----------------------------------------------------------
    (
        # "<bcc@example.com>\0" = 18; len 19.
        "addrcpt",
        b"\x00\x00\x00\x13" + b"+" + b"<bcc@example.com>\x00",
        AddRecipient(address="<bcc@example.com>"),
        {},
    ),
    (
        # "<bcc@example.com>\0" (18) + "NOTIFY=NEVER ORCPT=rfc822;a@b\0" (30) = 48; len 49.
        "addrcpt-par",
        b"\x00\x00\x00\x31"
        + b"2"
        + b"<bcc@example.com>\x00"
        + b"NOTIFY=NEVER ORCPT=rfc822;a@b\x00",
        AddRecipient(address="<bcc@example.com>", args="NOTIFY=NEVER ORCPT=rfc822;a@b"),
        {},
    ),
    (
        # "<carol@example.net>\0" = 20; len 21.
        "delrcpt",
        b"\x00\x00\x00\x15" + b"-" + b"<carol@example.net>\x00",
        DeleteRecipient(address="<carol@example.net>"),
        {},
    ),
    (
        # "<bounce@example.com>\0" = 21; len 22.
        "chgfrom",
        b"\x00\x00\x00\x16" + b"e" + b"<bounce@example.com>\x00",
        ChangeSender(address="<bounce@example.com>"),
        {},
    ),
    (
        # 21 + "RET=HDRS ENVID=x1\0" (18) = 39; len 40 = 0x28.
        "chgfrom-with-args",
        b"\x00\x00\x00\x28" + b"e" + b"<bounce@example.com>\x00" + b"RET=HDRS ENVID=x1\x00",
        ChangeSender(address="<bounce@example.com>", args="RET=HDRS ENVID=x1"),
        {},
    ),
    # ---- b: replace body ----------------------------------------------------------------
    (
        # "New body\r\n" = 10; len 11.
        "replbody-small",
        b"\x00\x00\x00\x0b" + b"b" + b"New body\r\n",
        ReplaceBody(chunk=b"New body\r\n"),
        {},
    ),
    (
        # An empty replacement body is still one (empty) packet.
        "replbody-empty",
        bytes.fromhex("00000001 62"),
        ReplaceBody(chunk=b""),
        {},
    ),
    (
        # Split at max_data_size=4: "abcd" (len 5), "efgh" (len 5), "ij" (len 3).
        "replbody-split-max-4",
        b"\x00\x00\x00\x05"
        + b"b"
        + b"abcd"
        + b"\x00\x00\x00\x05"
        + b"b"
        + b"efgh"
        + b"\x00\x00\x00\x03"
        + b"b"
        + b"ij",
        ReplaceBody(chunk=b"abcdefghij"),
        {"max_data_size": 4},
    ),
    (
        # max_data_size does not split a body that fits: "New body\r\n" = 10; len 11.
        "replbody-max-256k",
        b"\x00\x00\x00\x0b" + b"b" + b"New body\r\n",
        ReplaceBody(chunk=b"New body\r\n"),
        {"max_data_size": 262143},
    ),
    # ---- q: quarantine ------------------------------------------------------------------
    (
        # "suspicious attachment\0" = 22; len 23.
        "quarantine",
        b"\x00\x00\x00\x17" + b"q" + b"suspicious attachment\x00",
        Quarantine(reason="suspicious attachment"),
        {},
    ),
]

#: Vectors that encode to several packets (decoding gives one model per packet).
ENCODE_ONLY_RESPONSES: Final = frozenset({"replbody-split-max-4"})
