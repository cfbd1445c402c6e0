"""Tests for milterapp.spec: parsing, canonical form, MTA forms and the default spec."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from milterapp.errors import ConnectionSpecError, MilterError
from milterapp.spec import DEFAULT_SPEC, ConnectionSpec, Scheme, default_connection_spec

# --------------------------------------------------------------------------------------------
# Valid forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "port", "host"),
    [
        ("inet:10025", "inet", 10025, None),
        ("inet:10025@localhost", "inet", 10025, "localhost"),
        ("inet:10025@mail.example.com", "inet", 10025, "mail.example.com"),
        ("inet:10025@Mail.Example.COM.", "inet", 10025, "Mail.Example.COM."),
        ("inet:10025@[127.0.0.1]", "inet", 10025, "127.0.0.1"),
        ("inet:10025@192.0.2.1", "inet", 10025, "192.0.2.1"),
        ("inet:1", "inet", 1, None),
        ("inet:65535", "inet", 65535, None),
        ("inet:010025", "inet", 10025, None),
        ("inet6:10025", "inet6", 10025, None),
        ("inet6:10025@localhost", "inet6", 10025, "localhost"),
        ("inet6:10025@[::1]", "inet6", 10025, "::1"),
        ("inet6:10025@[2001:DB8:0:0::1]", "inet6", 10025, "2001:db8::1"),
        ("inet6:10025@[fe80::1%eth0]", "inet6", 10025, "fe80::1%eth0"),
        ("inet6:10025@::1", "inet6", 10025, "::1"),
        (
            "inet6:10025@[::ffff:192.0.2.1]",
            "inet6",
            10025,
            str(ipaddress.ip_address("::ffff:192.0.2.1")),
        ),
        ("INET:10025", "inet", 10025, None),
    ],
)
def test_parse_inet_forms(text: str, scheme: str, port: int, host: str | None) -> None:
    spec = ConnectionSpec.parse(text)
    assert (spec.scheme, spec.port, spec.host, spec.path) == (scheme, port, host, None)


@pytest.mark.parametrize(
    ("text", "scheme", "port", "host"),
    [
        ("inet:127.0.0.1:10025", "inet", 10025, "127.0.0.1"),
        ("inet:localhost:10025", "inet", 10025, "localhost"),
        ("inet:[127.0.0.1]:10025", "inet", 10025, "127.0.0.1"),
        ("inet:[::1]:10025", "inet6", 10025, "::1"),
        ("inet6:[::1]:10025", "inet6", 10025, "::1"),
    ],
)
def test_parse_postfix_forms(text: str, scheme: str, port: int, host: str) -> None:
    spec = ConnectionSpec.parse(text)
    assert (spec.scheme, spec.port, spec.host, spec.path) == (scheme, port, host, None)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("unix:/run/milter.sock", "/run/milter.sock"),
        ("local:/run/milter.sock", "/run/milter.sock"),
        ("LOCAL:/run/milter.sock", "/run/milter.sock"),
        ("unix:milter.sock", "milter.sock"),
        ("unix:/tmp/a b:c@[d]", "/tmp/a b:c@[d]"),
    ],
)
def test_parse_unix_forms(text: str, path: str) -> None:
    spec = ConnectionSpec.parse(text)
    assert (spec.scheme, spec.port, spec.host, spec.path) == ("unix", None, None, path)


# --------------------------------------------------------------------------------------------
# Invalid forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the spec is empty"),
        ("10025", "there is no scheme.*inet, inet6, unix or local"),
        ("tcp:10025", "unknown scheme 'tcp'.*inet, inet6, unix or local"),
        ("inet:", "the port is missing"),
        ("inet:@localhost", "the port is missing"),
        ("inet:localhost:", "the port is missing"),
        ("inet:[::1]", "the port is missing"),
        ("inet:abc", "port 'abc' is not a number"),
        ("inet:10025x@localhost", "port '10025x' is not a number"),
        ("inet:-1", "port '-1' is not a number"),
        ("inet:\u0661\u0662", "is not a number"),
        ("inet:65536", "port 65536 is out of range 0..65535"),
        ("inet:" + "9" * 5000, "out of range"),
        ("inet:10025@", "the host after '@' is empty"),
        ("inet::10025", "the host before ':' is empty"),
        ("inet:10025@[127.0.0.1", r"'\[' is not closed by '\]'"),
        ("inet:10025@[]", "the brackets are empty"),
        ("inet:10025@[127.0.0.1]x", r"unexpected 'x' after '\]'"),
        ("inet:[127.0.0.1]x", r"unexpected 'x' after '\]'"),
        ("inet:10025@[localhost]", r"'localhost' inside \[\] is not a valid IPv4 address"),
        ("inet:10025@[256.0.0.1]", "not a valid IPv4 address"),
        ("inet6:10025@[::g]", "not a valid IPv6 address"),
        ("inet6:10025@[127.0.0.1]", "is an IPv4 address; use inet:PORT@"),
        ("inet:10025@[::1]", r"is an IPv6 address; use inet6:PORT@\[::1\]"),
        ("inet:10025@::1", "is an IPv6 address"),
        ("inet:::1:10025", r"needs brackets: inet6:PORT@\[::1\]"),
        ("inet:10025@256.1.1.1", "'256.1.1.1' is not a valid IPv4 address"),
        ("inet:10025@bad host", "'bad host' is not a valid host name"),
        ("inet:10025@a@b", "'a@b' is not a valid host name"),
        ("inet:10025@-bad", "is not a valid host name"),
        ("inet6:10025@[fe80::1%a b]", "invalid scope"),
        ("unix:", "the socket path is empty"),
        ("local:", "the socket path is empty"),
        ("unix:/run/a\x00b", "contains a NUL character"),
    ],
)
def test_parse_rejects_invalid_forms(text: str, problem: str) -> None:
    with pytest.raises(ConnectionSpecError, match=problem) as info:
        ConnectionSpec.parse(text)
    message = str(info.value)
    assert message.startswith(f"invalid connection spec {text!r}: ")
    assert re.search(r"\(for example '(inet|inet6|unix):[^']+'\)$", message)


def test_parse_error_example_matches_the_scheme() -> None:
    with pytest.raises(ConnectionSpecError, match=r"for example 'unix:/"):
        ConnectionSpec.parse("unix:")
    with pytest.raises(ConnectionSpecError, match=r"for example 'inet6:10025@\[::1\]'"):
        ConnectionSpec.parse("inet6:x")


def test_connection_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid connection spec"):
        ConnectionSpec.parse("bogus")
    assert issubclass(ConnectionSpecError, ValueError)
    assert issubclass(ConnectionSpecError, MilterError)


# --------------------------------------------------------------------------------------------
# The model validates on construction too
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"scheme": "inet", "port": -1}, "greater than or equal to 0"),
        ({"scheme": "inet", "port": 65536}, "less than or equal to 65535"),
        ({"scheme": "inet"}, "the port is missing"),
        ({"scheme": "inet", "port": 1, "path": "/x"}, "not a path"),
        ({"scheme": "inet", "port": 1, "host": "::1"}, "is an IPv6 address"),
        ({"scheme": "inet", "port": 1, "host": "[127.0.0.1]"}, "not a valid host name"),
        ({"scheme": "inet6", "port": 1, "host": "127.0.0.1"}, "is an IPv4 address"),
        ({"scheme": "unix", "path": ""}, "the socket path is empty"),
        ({"scheme": "unix"}, "the socket path is empty"),
        ({"scheme": "unix", "path": "/a\x00"}, "NUL"),
        ({"scheme": "unix", "path": "/a", "port": 1}, "not a port or host"),
        ({"scheme": "unix", "path": "/a", "host": "h"}, "not a port or host"),
        ({"scheme": "local", "path": "/a"}, "scheme"),
        ({"scheme": "inet", "port": 1, "extra": 1}, "extra"),
    ],
)
def test_connection_spec_validates_fields(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ConnectionSpec.model_validate(fields)


def test_connection_spec_normalises_addresses() -> None:
    spec = ConnectionSpec(scheme="inet6", port=10025, host="0:0:0::1")
    assert spec == ConnectionSpec.parse("inet6:10025@[::1]")


def test_connection_spec_is_frozen_and_hashable() -> None:
    spec = ConnectionSpec.parse("inet:10025")
    with pytest.raises(ValidationError, match="frozen"):
        spec.port = 1  # type: ignore[misc]
    assert {spec, ConnectionSpec.parse("inet:010025")} == {spec}


# --------------------------------------------------------------------------------------------
# Canonical form and round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("inet:10025", "inet:10025"),
        ("inet:10025@localhost", "inet:10025@localhost"),
        ("inet:10025@127.0.0.1", "inet:10025@[127.0.0.1]"),
        ("inet:127.0.0.1:10025", "inet:10025@[127.0.0.1]"),
        ("inet:localhost:10025", "inet:10025@localhost"),
        ("inet:[::1]:10025", "inet6:10025@[::1]"),
        ("inet6:10025@[0::1]", "inet6:10025@[::1]"),
        ("local:/run/milter.sock", "unix:/run/milter.sock"),
        ("unix:relative.sock", "unix:relative.sock"),
    ],
)
def test_format_gives_canonical_form(text: str, canonical: str) -> None:
    spec = ConnectionSpec.parse(text)
    assert spec.format() == canonical
    assert str(spec) == canonical


_LABEL = st.from_regex(r"[a-zA-Z0-9_](?:[a-zA-Z0-9_-]{0,8}[a-zA-Z0-9_])?", fullmatch=True)
_HOSTNAMES = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: not re.fullmatch(r"[0-9.]+", name))
)
_PORTS = st.integers(min_value=1, max_value=65535)
_PATHS = st.text(st.characters(exclude_characters="\x00"), min_size=1)


@st.composite
def _specs(draw: st.DrawFn) -> ConnectionSpec:
    kind = draw(st.sampled_from(["inet", "inet6", "unix"]))
    if kind == "unix":
        return ConnectionSpec(scheme="unix", path=draw(_PATHS))
    addresses = st.ip_addresses(v=4) if kind == "inet" else st.ip_addresses(v=6)
    host = draw(st.none() | _HOSTNAMES | addresses.map(str))
    scheme: Scheme = "inet" if kind == "inet" else "inet6"
    return ConnectionSpec(scheme=scheme, port=draw(_PORTS), host=host)


@given(_specs())
def test_format_round_trips_through_parse(spec: ConnectionSpec) -> None:
    assert ConnectionSpec.parse(str(spec)) == spec
    assert ConnectionSpec.parse(spec.sendmail_form()).format() == spec.sendmail_form().replace(
        "local:", "unix:", 1
    )


@given(st.text() | st.from_regex(r"(inet6?|unix|local):[0-9a-f:.@\[\]]*", fullmatch=True))
def test_parse_fails_only_with_connection_spec_error(text: str) -> None:
    try:
        spec = ConnectionSpec.parse(text)
    except ConnectionSpecError:
        return
    assert ConnectionSpec.parse(str(spec)) == spec


# --------------------------------------------------------------------------------------------
# Hosts to bind and to connect to; Postfix and Sendmail forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "listen", "connect"),
    [
        ("inet:10025", "0.0.0.0", "127.0.0.1"),
        ("inet6:10025", "::", "::1"),
        ("inet:10025@[0.0.0.0]", "0.0.0.0", "127.0.0.1"),
        ("inet6:10025@[::]", "::", "::1"),
        ("inet:10025@[192.0.2.1]", "192.0.2.1", "192.0.2.1"),
        ("inet:10025@mail.example", "mail.example", "mail.example"),
        ("unix:/run/m.sock", None, None),
    ],
)
def test_listen_and_connect_hosts(text: str, listen: str | None, connect: str | None) -> None:
    spec = ConnectionSpec.parse(text)
    assert spec.listen_host == listen
    assert spec.connect_host == connect


@pytest.mark.parametrize(
    ("text", "postfix", "sendmail"),
    [
        ("inet:10025", "inet:127.0.0.1:10025", "inet:10025@[127.0.0.1]"),
        ("inet:10025@localhost", "inet:localhost:10025", "inet:10025@localhost"),
        ("inet:10025@[192.0.2.1]", "inet:192.0.2.1:10025", "inet:10025@[192.0.2.1]"),
        ("inet6:10025", "inet:[::1]:10025", "inet6:10025@[::1]"),
        ("inet6:10025@[2001:db8::1]", "inet:[2001:db8::1]:10025", "inet6:10025@[2001:db8::1]"),
        ("inet6:10025@mail.example", "inet:mail.example:10025", "inet6:10025@mail.example"),
        ("unix:/run/milter.sock", "unix:/run/milter.sock", "local:/run/milter.sock"),
        ("local:rel.sock", "unix:rel.sock", "local:rel.sock"),
    ],
)
def test_mta_forms(text: str, postfix: str, sendmail: str) -> None:
    spec = ConnectionSpec.parse(text)
    assert spec.postfix_form() == postfix
    assert spec.sendmail_form() == sendmail


@given(_specs())
def test_postfix_form_parses_back_to_the_connect_host(spec: ConnectionSpec) -> None:
    parsed = ConnectionSpec.parse(spec.postfix_form())
    expected = spec.model_copy(update={"host": spec.connect_host})
    if spec.scheme == "inet6" and ":" not in (spec.host or ":"):
        expected = expected.model_copy(update={"scheme": "inet"})  # a name loses its family
    assert parsed == expected


# --------------------------------------------------------------------------------------------
# The default spec
# --------------------------------------------------------------------------------------------


def test_default_connection_spec_is_loopback_only() -> None:
    spec = default_connection_spec()
    assert DEFAULT_SPEC == "inet:10025@[127.0.0.1]"
    assert str(spec) == DEFAULT_SPEC
    assert spec.listen_host is not None
    assert ipaddress.ip_address(spec.listen_host).is_loopback
    assert spec.postfix_form() == "inet:127.0.0.1:10025"
