"""repr() and str() of events and replies: the class and the fields that are set, nothing more.

Every public event and reply class is covered: a new class without samples here fails
``test_every_event_and_reply_class_has_samples``.
"""

from __future__ import annotations

import inspect
import ipaddress
from typing import Any

import pytest
from pydantic import BaseModel

from milterapp import events, replies
from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.events import (
    REPR_BYTES_LIMIT,
    Abort,
    AddressFamily,
    Body,
    Connect,
    ConnectionClosed,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
    Unparsed,
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
    Shutdown,
    Skip,
    TempFail,
)

#: Per class: (model, its repr). The first sample of each class gives only required fields.
SAMPLES: dict[type[BaseModel], list[tuple[BaseModel, str]]] = {
    # Replies.
    Continue: [(Continue(), "Continue()")],
    Accept: [(Accept(), "Accept()")],
    Discard: [(Discard(), "Discard()")],
    Skip: [(Skip(), "Skip()")],
    Progress: [(Progress(), "Progress()")],
    Shutdown: [(Shutdown(), "Shutdown()")],
    TempFail: [
        (TempFail(), "TempFail()"),
        (
            TempFail(code=451, xcode="4.3.0", text="try later"),
            "TempFail(code=451, xcode='4.3.0', text='try later')",
        ),
        (TempFail(text="busy"), "TempFail(code=451, text='busy')"),
    ],
    Reject: [
        (Reject(), "Reject()"),
        (Reject(text="5.7.1 go away"), "Reject(code=550, xcode='5.7.1', text='go away')"),
        (Reject(code=554, text="one\ntwo"), "Reject(code=554, text='one\\ntwo')"),
    ],
    AddHeader: [(AddHeader(name="X-A", value="1"), "AddHeader(name='X-A', value='1')")],
    InsertHeader: [
        (
            InsertHeader(name="X-A", value="1", index=0),
            "InsertHeader(name='X-A', value='1', index=0)",
        )
    ],
    ChangeHeader: [
        (ChangeHeader(name="Subject", value="hi"), "ChangeHeader(name='Subject', value='hi')"),
        (
            ChangeHeader(name="X-Tag", value="", index=2),
            "ChangeHeader(name='X-Tag', value='', index=2)",
        ),
    ],
    AddRecipient: [
        (AddRecipient(address="b@example.net"), "AddRecipient(address='b@example.net')"),
        (
            AddRecipient(address="b@example.net", args="NOTIFY=NEVER"),
            "AddRecipient(address='b@example.net', args='NOTIFY=NEVER')",
        ),
    ],
    DeleteRecipient: [
        (DeleteRecipient(address="<b@example.net>"), "DeleteRecipient(address='<b@example.net>')")
    ],
    ChangeSender: [
        (ChangeSender(address="a@example.org"), "ChangeSender(address='a@example.org')"),
        (
            ChangeSender(address="a@example.org", args="SIZE=10"),
            "ChangeSender(address='a@example.org', args='SIZE=10')",
        ),
    ],
    ReplaceBody: [(ReplaceBody(chunk=b"new\r\n"), "ReplaceBody(chunk=b'new\\r\\n')")],
    Quarantine: [(Quarantine(reason="looks odd"), "Quarantine(reason='looks odd')")],
    NegotiationReply: [
        (NegotiationReply(), "NegotiationReply()"),
        (
            NegotiationReply(
                version=2,
                actions=ActionFlag.ADDHDRS | ActionFlag.CHGBODY,
                protocol=ProtocolFlag.NOHELO,
                macros={MacroStage.ENVFROM: ("i", "{auth_authen}")},
            ),
            "NegotiationReply(version=2, actions=ActionFlag.ADDHDRS|ActionFlag.CHGBODY, "
            "protocol=ProtocolFlag.NOHELO, macros={MacroStage.ENVFROM: ('i', '{auth_authen}')})",
        ),
    ],
    # Events.
    Event: [(Event(), "Event()")],
    Negotiate: [
        (
            Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE),
            "Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE)",
        ),
        (
            Negotiate(version=6, actions=ActionFlag(0x201), protocol=ProtocolFlag.SKIP),
            "Negotiate(version=6, actions=ActionFlag.ADDHDRS|ActionFlag(512), "
            "protocol=ProtocolFlag.SKIP)",
        ),
    ],
    Macros: [
        (Macros(stage="C"), "Macros(stage='C')"),
        (
            Macros(stage="M", values={"i": "Q1", "{auth_type}": "PLAIN"}),
            "Macros(stage='M', values={'i': 'Q1', '{auth_type}': 'PLAIN'})",
        ),
    ],
    Connect: [
        (
            Connect(hostname="localhost", family=AddressFamily.UNKNOWN),
            "Connect(hostname='localhost', family=AddressFamily.UNKNOWN)",
        ),
        (
            Connect(
                hostname="[192.0.2.7]", family=AddressFamily.INET, port=4321, address="192.0.2.7"
            ),
            "Connect(hostname='[192.0.2.7]', family=AddressFamily.INET, port=4321, "
            "address=IPv4Address('192.0.2.7'))",
        ),
        (
            Connect(hostname="mx", family=AddressFamily.INET6, port=25, address="2001:db8::1"),
            "Connect(hostname='mx', family=AddressFamily.INET6, port=25, "
            "address=IPv6Address('2001:db8::1'))",
        ),
        (
            Connect(hostname="local", family=AddressFamily.UNIX, port=0, address="/run/s"),
            "Connect(hostname='local', family=AddressFamily.UNIX, port=0, address='/run/s')",
        ),
    ],
    Helo: [(Helo(name="client.example"), "Helo(name='client.example')")],
    EnvFrom: [
        (EnvFrom(address="a@b.c"), "EnvFrom(address='a@b.c')"),
        (EnvFrom.from_raw("<a@b.c>"), "EnvFrom(address='a@b.c')"),  # raw as derived
        (
            EnvFrom.from_raw("<a@b.c>", ["SIZE=1024", "SMTPUTF8"]),
            "EnvFrom(address='a@b.c', args=['SIZE=1024', 'SMTPUTF8'])",
        ),
        (EnvFrom.from_raw("<>"), "EnvFrom(address='')"),
        (EnvFrom.from_raw(""), "EnvFrom(address='', raw='')"),
    ],
    EnvRcpt: [
        (EnvRcpt(address="b@example.net"), "EnvRcpt(address='b@example.net')"),
        (
            EnvRcpt.from_raw("b@example.net"),  # sent without brackets: raw says so
            "EnvRcpt(address='b@example.net', raw='b@example.net')",
        ),
    ],
    Data: [(Data(), "Data()")],
    Header: [
        (Header(name="Subject", value="hi"), "Header(name='Subject', value='hi')"),
        (
            Header(name="Subject", value=" hi", leading_space=True),
            "Header(name='Subject', value=' hi', leading_space=True)",
        ),
    ],
    EndOfHeaders: [(EndOfHeaders(), "EndOfHeaders()")],
    Body: [(Body(chunk=b"Hello.\r\n"), "Body(chunk=b'Hello.\\r\\n')")],
    EndOfMessage: [
        (EndOfMessage(), "EndOfMessage()"),
        (EndOfMessage(chunk=b"last"), "EndOfMessage(chunk=b'last')"),
    ],
    Abort: [(Abort(), "Abort()")],
    Quit: [(Quit(), "Quit()")],
    QuitNoClose: [(QuitNoClose(), "QuitNoClose()")],
    Unknown: [(Unknown(line="XYZZY"), "Unknown(line='XYZZY')")],
    Unparsed: [(Unparsed(), "Unparsed()")],
    ConnectionOpened: [
        (ConnectionOpened(), "ConnectionOpened()"),
        (ConnectionOpened(peer="127.0.0.1:4000"), "ConnectionOpened(peer='127.0.0.1:4000')"),
    ],
    ConnectionClosed: [(ConnectionClosed(), "ConnectionClosed()")],
}

ALL_SAMPLES = [sample for samples in SAMPLES.values() for sample in samples]
CLASSES: list[type[BaseModel]] = sorted(SAMPLES, key=lambda model_class: model_class.__name__)
#: What eval() of a repr needs, besides the classes.
NAMESPACE: dict[str, Any] = {
    **{name: getattr(events, name) for name in events.__all__},
    **{name: getattr(replies, name) for name in replies.__all__},
    "ActionFlag": ActionFlag,
    "ProtocolFlag": ProtocolFlag,
    "MacroStage": MacroStage,
    "IPv4Address": ipaddress.IPv4Address,
    "IPv6Address": ipaddress.IPv6Address,
}


def model_classes() -> set[type[BaseModel]]:
    """Every public event and reply class of the two modules (bases included)."""
    found: set[type[BaseModel]] = set()
    for module, base in ((events, events.Event), (replies, replies._Response)):
        for name, value in vars(module).items():
            if (
                not name.startswith("_")
                and inspect.isclass(value)
                and issubclass(value, base)
                and value.__module__ == module.__name__
            ):
                found.add(value)
    return found


def test_every_event_and_reply_class_has_samples() -> None:
    classes = model_classes()
    assert len(classes) > 30
    missing = sorted(cls.__name__ for cls in classes - set(SAMPLES))
    assert not missing, f"add repr samples for {missing}"
    assert all(samples for samples in SAMPLES.values())


@pytest.mark.parametrize(("model", "expected"), ALL_SAMPLES, ids=lambda v: str(v)[:50])
def test_repr_and_str_show_the_class_and_the_fields_set(model: BaseModel, expected: str) -> None:
    assert repr(model) == expected
    assert str(model) == expected
    assert f"{model}" == expected


@pytest.mark.parametrize(("model", "expected"), ALL_SAMPLES, ids=lambda v: str(v)[:50])
def test_repr_gives_back_an_equal_model(model: BaseModel, expected: str) -> None:
    # Leaving out the defaults loses nothing: the repr builds the same model.
    assert eval(repr(model), NAMESPACE) == model  # noqa: S307 - our own reprs


@pytest.mark.parametrize("cls", CLASSES, ids=[cls.__name__ for cls in CLASSES])
def test_a_model_with_only_required_fields_shows_only_those(cls: type[BaseModel]) -> None:
    model, _ = SAMPLES[cls][0]
    required = [name for name, field in cls.model_fields.items() if field.is_required()]
    assert [name for name, _ in model.__repr_args__()] == required


BYTES_FIELDS = [
    (cls, name)
    for cls in CLASSES
    for name, field in cls.model_fields.items()
    if field.annotation in (bytes, "bytes")
]


def test_bytes_fields_are_found() -> None:
    assert {(cls, name) for cls, name in BYTES_FIELDS} >= {
        (Body, "chunk"),
        (EndOfMessage, "chunk"),
        (ReplaceBody, "chunk"),
    }


@pytest.mark.parametrize(
    ("cls", "name"), BYTES_FIELDS, ids=[f"{cls.__name__}.{name}" for cls, name in BYTES_FIELDS]
)
def test_long_bytes_are_cut_short_with_their_length(cls: type[BaseModel], name: str) -> None:
    model, _ = SAMPLES[cls][0]
    chunk = b"Subject: hello\r\n" * 256  # 4096 bytes
    long = model.model_copy(update={name: chunk})
    text = repr(long)
    assert text.startswith(f"{cls.__name__}({name}=b'Subject: hello\\r\\nSubject")
    assert text.endswith("... (4096 bytes))")
    assert len(text) < 120
    assert str(long) == text
    # At the limit, bytes are shown whole.
    whole = model.model_copy(update={name: b"x" * REPR_BYTES_LIMIT})
    assert repr(whole) == f"{cls.__name__}({name}={b'x' * REPR_BYTES_LIMIT!r})"


def test_a_handler_log_line_reads_well() -> None:
    verdict = TempFail(code=451, xcode="4.3.0", text="try later")
    assert f"verdict: {verdict}" == "verdict: TempFail(code=451, xcode='4.3.0', text='try later')"
    assert f"{[AddHeader(name='X-A', value='1'), Continue()]}" == (
        "[AddHeader(name='X-A', value='1'), Continue()]"
    )
