"""Tag the subject of mail from outside the organisation.

Run: ``python examples/subject_tag.py [--spec SPEC]``.
"""

from milterapp import App, Context, EndOfMessage, EnvFrom, Header

INTERNAL = frozenset({"example.org"})
TAG = "[EXTERNAL]"

app = App("subject-tag")


@app.on("envfrom")
def classify(event: EnvFrom, ctx: Context) -> None:
    ctx.message.external = event.domain not in INTERNAL


@app.on("header")
def remember_subject(event: Header, ctx: Context) -> None:
    if event.name.lower() == "subject":
        ctx.message.subject = event.value


@app.on("eom")
def tag(event: EndOfMessage, ctx: Context) -> None:
    if not getattr(ctx.message, "external", False):
        return
    subject = getattr(ctx.message, "subject", None)
    if subject is None:
        ctx.add_header("Subject", TAG)
    elif not subject.startswith(TAG):
        ctx.change_header("Subject", f"{TAG} {subject}")


if __name__ == "__main__":
    app.run()
