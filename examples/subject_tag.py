"""Tag the subject of mail from outside the organisation.

Run: ``python examples/subject_tag.py [--spec SPEC]``.
"""

from dataclasses import dataclass

from milterapp import App, Context, EndOfMessage, Header

INTERNAL = frozenset({"example.org"})
TAG = "[EXTERNAL]"


@dataclass
class Subject:
    """The message's Subject: header, if it has one."""

    value: str | None = None


app = App("subject-tag", message_state=Subject)


@app.on("header")
def remember_subject(event: Header, ctx: Context[Subject]) -> None:
    if event.name.lower() == "subject":
        ctx.message.state.value = event.value


@app.on("eom")
def tag(event: EndOfMessage, ctx: Context[Subject]) -> None:
    if ctx.message.sender.domain in INTERNAL:
        return
    subject = ctx.message.state.value
    if subject is None:
        ctx.add_header("Subject", TAG)
    elif not subject.startswith(TAG):
        ctx.change_header("Subject", f"{TAG} {subject}")


if __name__ == "__main__":
    app.run()
