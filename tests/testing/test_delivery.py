"""apply(): what Postfix and Sendmail deliver after a milter's modifications (§4, §6)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterapp.replies import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    ReplaceBody,
)
from milterapp.testing.delivery import (
    DEFAULT_MTA_HEADERS,
    DeliveredMessage,
    apply,
    parse_message,
    unified_diff,
)
from milterapp.testing.profiles import POSTFIX, SENDMAIL, MtaProfile

SENDER = "sender@test.example"
RECEIVED = ("Received", "from client.example by mx.example.net")
HEADERS = [("From", SENDER), ("Subject", "old"), ("X-T", "a"), ("X-T", "b"), ("X-T", "c")]
BOTH = pytest.mark.parametrize("mta", [POSTFIX, SENDMAIL], ids=["postfix", "sendmail"])


def run(
    mta: MtaProfile,
    *modifications: Modification,
    headers: Sequence[tuple[str, str]] = HEADERS,
    recipients: Sequence[str] = ("<bob@example.org>",),
    body: bytes = b"Hello.\r\n",
    leading_space: bool = False,
) -> DeliveredMessage:
    return apply(
        modifications,
        sender=f"<{SENDER}>",
        recipients=recipients,
        headers=headers,
        body=body,
        profile=mta,
        mta_headers=[RECEIVED],
        leading_space=leading_space,
    )


def names(message: DeliveredMessage) -> list[str]:
    return [name for name, _ in message.headers]


# --- no modification ----------------------------------------------------------------------


@BOTH
def test_apply_nothing_keeps_message_below_mta_headers(mta: MtaProfile) -> None:
    delivered = run(mta)
    assert delivered.headers == (RECEIVED, *HEADERS)
    assert delivered.sender == SENDER
    assert delivered.recipients == ("bob@example.org",)
    assert delivered.body == b"Hello.\r\n"
    assert delivered.quarantine is None


def test_apply_default_mta_headers_is_one_received() -> None:
    delivered = apply([], sender="", recipients=[], headers=[], body=b"", profile=POSTFIX)
    assert names(delivered) == ["Received"]
    assert delivered.headers == DEFAULT_MTA_HEADERS


# --- adding and inserting -----------------------------------------------------------------


@BOTH
def test_apply_add_header_appends(mta: MtaProfile) -> None:
    delivered = run(mta, AddHeader(name="X-Stamped", value="yes"))
    assert delivered.headers[-1] == ("X-Stamped", "yes")
    assert len(delivered.headers) == len(HEADERS) + 2


def test_apply_add_header_existing_name_postfix_appends() -> None:
    delivered = run(POSTFIX, AddHeader(name="x-t", value="d"))
    assert delivered.headers[-1] == ("x-t", "d")


def test_apply_add_header_existing_name_sendmail_goes_before_the_first() -> None:
    delivered = run(SENDMAIL, AddHeader(name="x-t", value="d"))
    assert delivered.headers[3:] == (("x-t", "d"), ("X-T", "a"), ("X-T", "b"), ("X-T", "c"))


@BOTH
@pytest.mark.parametrize(("index", "position"), [(0, 0), (1, 1), (2, 2), (6, 6), (7, 6), (1000, 6)])
def test_apply_insert_header_positions(mta: MtaProfile, index: int, position: int) -> None:
    # 0 above the MTA's Received:, 1 just below it, higher indexes count the whole list,
    # past the end appends (six headers: Received + five).
    delivered = run(mta, InsertHeader(index=index, name="X-New", value="n"))
    assert names(delivered).index("X-New") == position
    assert len(delivered.headers) == 7


@BOTH
def test_apply_insert_at_top_is_above_received(mta: MtaProfile) -> None:
    # tests/e2e/test_postfix.py::test_postfix_header_inserted_at_top (and test_sendmail's).
    delivered = run(mta, InsertHeader(index=0, name="X-Top", value="first"))
    assert names(delivered)[:3] == ["X-Top", "Received", "From"]
    parsed = delivered.as_email()
    assert list(parsed.keys())[:2] == ["X-Top", "Received"]


def test_apply_insert_counts_sendmail_deleted_headers_but_not_postfix_removed_ones() -> None:
    delete_from = ChangeHeader(name="From", value="", index=1)
    insert = InsertHeader(index=2, name="X-New", value="n")
    assert names(run(POSTFIX, delete_from, insert))[:3] == ["Received", "Subject", "X-New"]
    assert names(run(SENDMAIL, delete_from, insert))[:3] == ["Received", "X-New", "Subject"]


# --- changing and deleting ----------------------------------------------------------------


@BOTH
def test_apply_change_header_replaces_value_in_place(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeHeader(name="Subject", value="new"))
    assert delivered.headers[2] == ("Subject", "new")
    assert len(delivered.headers) == 6


@BOTH
def test_apply_change_header_index_counts_only_that_name(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeHeader(name="X-T", value="B", index=2))
    assert delivered.headers_named("X-T") == ["a", "B", "c"]


@BOTH
def test_apply_change_header_index_zero_is_one(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeHeader(name="X-T", value="A", index=0))
    assert delivered.headers_named("X-T") == ["A", "b", "c"]


@BOTH
def test_apply_change_header_name_is_case_insensitive(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeHeader(name="SUBJECT", value="new"))
    assert delivered.header("subject") == "new"
    assert len(delivered.headers_named("Subject")) == 1


def test_apply_change_header_spelling_postfix_takes_the_milters_sendmail_keeps_its_own() -> None:
    change = ChangeHeader(name="SUBJECT", value="new")
    assert ("SUBJECT", "new") in run(POSTFIX, change).headers
    assert ("Subject", "new") in run(SENDMAIL, change).headers


@BOTH
def test_apply_change_header_never_touches_the_mta_headers(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeHeader(name="Received", value="", index=1))
    assert delivered.headers[0] == RECEIVED  # the milter never saw it: delete is a no-op


def test_apply_change_of_missing_occurrence_appends_postfix() -> None:
    delivered = run(POSTFIX, ChangeHeader(name="X-T", value="d", index=4))
    assert delivered.headers[-1] == ("X-T", "d")
    delivered = run(POSTFIX, ChangeHeader(name="X-New", value="n", index=3))
    assert delivered.headers[-1] == ("X-New", "n")


def test_apply_change_of_missing_occurrence_adds_sendmail() -> None:
    delivered = run(SENDMAIL, ChangeHeader(name="X-New", value="n", index=3))
    assert delivered.headers[-1] == ("X-New", "n")
    # Added like smfi_addheader: before the first header of that name.
    delivered = run(SENDMAIL, ChangeHeader(name="X-T", value="d", index=4))
    assert delivered.headers_named("X-T") == ["d", "a", "b", "c"]


@BOTH
def test_apply_delete_of_missing_occurrence_is_a_no_op(mta: MtaProfile) -> None:
    assert run(mta, ChangeHeader(name="X-T", value="", index=4)).headers == (RECEIVED, *HEADERS)
    assert run(mta, ChangeHeader(name="X-None", value="")).headers == (RECEIVED, *HEADERS)


def test_apply_delete_same_index_twice_postfix_renumbers() -> None:
    delete_first = ChangeHeader(name="X-T", value="", index=1)
    assert run(POSTFIX, delete_first, delete_first).headers_named("X-T") == ["c"]


def test_apply_delete_same_index_twice_sendmail_keeps_indexes() -> None:
    delete_first = ChangeHeader(name="X-T", value="", index=1)
    assert run(SENDMAIL, delete_first, delete_first).headers_named("X-T") == ["b", "c"]


def test_apply_delete_first_then_second_differs_between_mtas() -> None:
    first = ChangeHeader(name="X-T", value="", index=1)
    second = ChangeHeader(name="X-T", value="", index=2)
    assert run(POSTFIX, first, second).headers_named("X-T") == ["b"]
    assert run(SENDMAIL, first, second).headers_named("X-T") == ["c"]


@BOTH
def test_apply_delete_highest_index_first_is_portable(mta: MtaProfile) -> None:
    third = ChangeHeader(name="X-T", value="", index=3)
    second = ChangeHeader(name="X-T", value="", index=2)
    assert run(mta, third, second).headers_named("X-T") == ["a"]


def test_apply_sendmail_change_revives_a_deleted_header() -> None:
    delete = ChangeHeader(name="X-T", value="", index=2)
    revive = ChangeHeader(name="X-T", value="B", index=2)
    assert run(SENDMAIL, delete, revive).headers_named("X-T") == ["a", "B", "c"]


def test_apply_postfix_e2e_change_and_delete() -> None:
    # tests/e2e/test_postfix.py::test_postfix_header_changed_and_deleted, same input.
    headers = [
        ("From", SENDER),
        ("Subject", "change"),
        ("X-Twice", "first"),
        ("X-Twice", "second"),
        ("X-Drop", "gone"),
    ]
    delivered = run(
        POSTFIX,
        ChangeHeader(name="Subject", value="[tagged] change"),
        ChangeHeader(name="X-Twice", value="second changed", index=2),
        ChangeHeader(name="X-Drop", value=""),
        headers=headers,
    )
    parsed = delivered.as_email()
    assert parsed["Subject"] == "[tagged] change"
    assert parsed.get_all("X-Twice") == ["first", "second changed"]
    assert parsed.get_all("X-Drop") is None


def test_apply_sendmail_e2e_delete_then_change_second() -> None:
    # tests/e2e/test_sendmail.py::test_sendmail_header_changed_and_deleted; Postfix would
    # renumber, find no second X-Twice and append.
    headers = [("X-Twice", "first"), ("X-Twice", "second")]
    edits = (
        ChangeHeader(name="X-Twice", value="", index=1),
        ChangeHeader(name="X-Twice", value="second changed", index=2),
    )
    assert run(SENDMAIL, *edits, headers=headers).headers_named("X-Twice") == ["second changed"]
    assert run(POSTFIX, *edits, headers=headers).headers_named("X-Twice") == [
        "second",
        "second changed",
    ]


# --- header values and leading space ------------------------------------------------------


@BOTH
def test_apply_values_without_leading_space_get_one_space_on_the_wire(mta: MtaProfile) -> None:
    delivered = run(mta, AddHeader(name="X-A", value="x"), AddHeader(name="X-B", value=" y"))
    wire = delivered.as_bytes()
    assert b"\r\nX-A: x\r\n" in wire
    assert b"\r\nX-B:  y\r\n" in wire
    assert delivered.header("X-B") == " y"


@BOTH
def test_apply_values_with_leading_space_are_taken_as_written(mta: MtaProfile) -> None:
    delivered = run(
        mta,
        AddHeader(name="X-A", value=" x"),
        ChangeHeader(name="Subject", value="  two"),
        leading_space=True,
    )
    assert delivered.header("X-A") == "x"
    assert delivered.header("Subject") == " two"
    assert b"\r\nX-A: x\r\n" in delivered.as_bytes()


def test_apply_leading_space_single_space_value_is_not_a_deletion() -> None:
    delivered = run(POSTFIX, ChangeHeader(name="Subject", value=" "), leading_space=True)
    assert delivered.header("Subject") == ""


@BOTH
def test_apply_folded_value_is_written_with_crlf(mta: MtaProfile) -> None:
    delivered = run(mta, AddHeader(name="X-Long", value="part one\n\tpart two"))
    assert b"X-Long: part one\r\n\tpart two\r\n" in delivered.as_bytes()
    assert delivered.as_email()["X-Long"] == "part one\tpart two"


# --- body -----------------------------------------------------------------------------------


@BOTH
def test_apply_replace_body_chunks_concatenate(mta: MtaProfile) -> None:
    delivered = run(
        mta,
        ReplaceBody(chunk=b"first\r\n"),
        ReplaceBody(chunk=b"sec"),
        ReplaceBody(chunk=b"ond\r\n"),
    )
    assert delivered.body == b"first\r\nsecond\r\n"


@BOTH
def test_apply_replace_body_normalises_line_ends(mta: MtaProfile) -> None:
    assert run(mta, ReplaceBody(chunk=b"a\nb")).body == b"a\r\nb\r\n"
    assert run(mta, ReplaceBody(chunk=b"")).body == b""


def test_apply_replace_body_interleaved_postfix_refuses() -> None:
    with pytest.raises(ValueError, match="postfix refuses body replacement interleaved"):
        run(
            POSTFIX,
            ReplaceBody(chunk=b"a"),
            AddHeader(name="X-A", value="1"),
            ReplaceBody(chunk=b"b\r\n"),
        )


def test_apply_replace_body_interleaved_sendmail_appends() -> None:
    delivered = run(
        SENDMAIL,
        ReplaceBody(chunk=b"a"),
        AddHeader(name="X-A", value="1"),
        ReplaceBody(chunk=b"b\r\n"),
    )
    assert delivered.body == b"ab\r\n"
    assert delivered.header("X-A") == "1"


@BOTH
def test_apply_replace_body_after_other_modifications_is_fine(mta: MtaProfile) -> None:
    delivered = run(mta, AddHeader(name="X-A", value="1"), ReplaceBody(chunk=b"new\r\n"))
    assert delivered.body == b"new\r\n"


# --- envelope -------------------------------------------------------------------------------


@BOTH
def test_apply_recipients_added_and_deleted_with_and_without_brackets(mta: MtaProfile) -> None:
    delivered = run(
        mta,
        DeleteRecipient(address="<removed@example.org>"),
        AddRecipient(address="<archived@example.org>"),
        AddRecipient(address="extra@example.org", args="NOTIFY=NEVER"),
        DeleteRecipient(address="kept2@example.org"),
        recipients=["removed@example.org", "<kept@example.org>", "<kept2@example.org>"],
    )
    assert delivered.recipients == ("kept@example.org", "archived@example.org", "extra@example.org")


@BOTH
def test_apply_recipient_add_existing_and_delete_missing_change_nothing(mta: MtaProfile) -> None:
    delivered = run(
        mta,
        AddRecipient(address="<bob@EXAMPLE.org>"),
        DeleteRecipient(address="<nobody@example.org>"),
    )
    assert delivered.recipients == ("bob@example.org",)


def test_apply_recipient_local_part_is_case_sensitive() -> None:
    delivered = run(POSTFIX, DeleteRecipient(address="<BOB@example.org>"))
    assert delivered.recipients == ("bob@example.org",)


@BOTH
def test_apply_sender_changed(mta: MtaProfile) -> None:
    delivered = run(mta, ChangeSender(address="<bounces@test.example>", args="RET=HDRS"))
    assert delivered.sender == "bounces@test.example"


@BOTH
def test_apply_quarantine_keeps_the_last_reason(mta: MtaProfile) -> None:
    delivered = run(mta, Quarantine(reason="first"), Quarantine(reason="suspicious attachment"))
    assert delivered.quarantine == "suspicious attachment"


def test_apply_rejects_what_is_not_a_modification() -> None:
    with pytest.raises(TypeError, match="not a modification"):
        run(POSTFIX, Continue())  # type: ignore[arg-type]


# --- DeliveredMessage -----------------------------------------------------------------------


def test_delivered_message_header_lookup() -> None:
    delivered = run(POSTFIX)
    assert delivered.header("x-t") == "a"
    assert delivered.headers_named("X-t") == ["a", "b", "c"]
    assert delivered.header("X-None") is None
    assert delivered.headers_named("X-None") == []


def test_delivered_message_as_bytes() -> None:
    message = DeliveredMessage(
        sender="a@b",
        recipients=("c@d",),
        headers=(("Subject", "hi"), ("X-Empty", ""), ("X-Fold", "a\n b")),
        body=b"line\r\n",
    )
    assert message.as_bytes() == b"Subject: hi\r\nX-Empty:\r\nX-Fold: a\r\n b\r\n\r\nline\r\n"


def test_delivered_message_round_trip_through_bytes_and_email() -> None:
    delivered = run(
        SENDMAIL,
        AddHeader(name="X-Fold", value="one\n\ttwo"),
        AddHeader(name="X-Utf8", value="héllo"),
        ReplaceBody(chunk=b"body\r\n"),
    )
    again = DeliveredMessage.from_bytes(
        delivered.as_bytes(), sender=f"<{delivered.sender}>", recipients=delivered.recipients
    )
    assert again == delivered
    parsed = delivered.as_email()
    assert parsed["Subject"] == "old"
    assert parsed.get_all("X-T") == ["a", "b", "c"]
    assert parsed.get_content().splitlines() == ["body"]


def test_delivered_message_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        run(POSTFIX).sender = "x"  # type: ignore[misc]


def test_parse_message_lf_only_and_no_body() -> None:
    headers, body = parse_message(b"A: 1\nB:2\n  cont\n\nbody\nmore")
    assert headers == [("A", "1"), ("B", "2\n  cont")]
    assert body == b"body\r\nmore\r\n"
    assert parse_message(b"A: 1\r\n") == ([("A", "1")], b"")


@pytest.mark.parametrize("data", [b"no colon here\r\n\r\n", b": empty name\r\n\r\n"])
def test_parse_message_rejects_non_header_lines(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a header line"):
        parse_message(data)


# --- unified_diff ---------------------------------------------------------------------------


def test_unified_diff_shows_header_and_envelope_changes() -> None:
    before = run(POSTFIX)
    after = run(
        POSTFIX,
        ChangeHeader(name="Subject", value="new"),
        ChangeSender(address="<bounces@test.example>"),
        DeleteRecipient(address="<bob@example.org>"),
        AddRecipient(address="<carol@example.org>"),
        Quarantine(reason="held"),
    )
    lines = unified_diff(before, after).splitlines()
    assert lines[:2] == ["--- before", "+++ after"]
    assert "-Subject: old" in lines
    assert "+Subject: new" in lines
    assert f"-MAIL FROM:<{SENDER}>" in lines
    assert "+MAIL FROM:<bounces@test.example>" in lines
    assert "-RCPT TO:<bob@example.org>" in lines
    assert "+RCPT TO:<carol@example.org>" in lines
    assert "+QUARANTINE: held" in lines


def test_unified_diff_of_equal_messages_is_empty() -> None:
    assert unified_diff(run(SENDMAIL), run(SENDMAIL)) == ""


def test_unified_diff_file_names_and_body() -> None:
    diff = unified_diff(
        run(POSTFIX), run(POSTFIX, ReplaceBody(chunk=b"Bye.\r\n")), fromfile="in", tofile="out"
    )
    assert diff.startswith("--- in\n+++ out\n")
    assert "-Hello.\n+Bye.\n" in diff


# --- properties -----------------------------------------------------------------------------

_NAMES = st.sampled_from(["X-A", "x-a", "X-B", "Subject"])
_VALUES = st.text(alphabet="ab \t", max_size=4)
_EDITS = st.one_of(
    st.builds(AddHeader, name=_NAMES, value=_VALUES),
    st.builds(InsertHeader, name=_NAMES, value=_VALUES, index=st.integers(0, 9)),
    st.builds(ChangeHeader, name=_NAMES, value=_VALUES, index=st.integers(0, 4)),
)
_START = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)


def _expected_delta(edit: Modification, present: int) -> int:
    if isinstance(edit, AddHeader | InsertHeader):
        return 1
    assert isinstance(edit, ChangeHeader)
    exists = max(edit.index, 1) <= present
    if edit.value:
        return 0 if exists else 1
    return -1 if exists else 0


@given(_START, st.lists(_EDITS, max_size=12))
def test_apply_postfix_header_count_arithmetic(
    start: list[tuple[str, str]], edits: list[Modification]
) -> None:
    previous = run(POSTFIX, headers=start)
    for step in range(len(edits)):
        current = run(POSTFIX, *edits[: step + 1], headers=start)
        edit = edits[step]
        assert isinstance(edit, AddHeader | InsertHeader | ChangeHeader)
        present = len(previous.headers_named(edit.name))
        delta = len(current.headers) - len(previous.headers)
        assert delta == _expected_delta(edit, present)
        previous = current


@given(_START, st.lists(_EDITS, max_size=12))
def test_apply_sendmail_header_edits_never_raise_and_stay_bounded(
    start: list[tuple[str, str]], edits: list[Modification]
) -> None:
    delivered = run(SENDMAIL, *edits, headers=start)
    adding = sum(1 for e in edits if not isinstance(e, ChangeHeader) or e.value)
    deleting = sum(1 for e in edits if isinstance(e, ChangeHeader) and not e.value)
    assert len(start) + 1 - deleting <= len(delivered.headers) <= len(start) + 1 + adding
    assert RECEIVED in delivered.headers


@given(_START, st.lists(_EDITS, max_size=8), st.binary(max_size=40))
def test_apply_result_round_trips_through_bytes(
    start: list[tuple[str, str]], edits: list[Modification], body: bytes
) -> None:
    for mta in (POSTFIX, SENDMAIL):
        delivered = run(mta, *edits, headers=start, body=body)
        again = DeliveredMessage.from_bytes(
            delivered.as_bytes(), sender=delivered.sender, recipients=delivered.recipients
        )
        assert again.headers == delivered.headers
        assert again.body == delivered.body
