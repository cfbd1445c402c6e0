"""Refuse listed senders at MAIL FROM and listed recipients at RCPT TO.

A refused recipient is refused alone: the message still goes to the others.
Run: ``python examples/blocklists.py [--spec SPEC]``.
"""

from milterapp import App, EnvFrom, EnvRcpt, Reject

app = App("blocklists")

BLOCKED_SENDERS = frozenset({"spammer@bad.example"})
BLOCKED_SENDER_DOMAINS = frozenset({"spam.example", "junk.example"})
BLOCKED_RECIPIENTS = frozenset({"noreply@example.org", "former-employee@example.org"})


@app.on("envfrom")
def check_sender(event: EnvFrom) -> Reject | None:
    if event.address.lower() in BLOCKED_SENDERS or event.domain in BLOCKED_SENDER_DOMAINS:
        return Reject(code=550, xcode="5.7.1", text="sender refused by policy")
    return None


@app.on("envrcpt")
def check_recipient(event: EnvRcpt) -> Reject | None:
    if event.address.lower() in BLOCKED_RECIPIENTS:
        return Reject(code=550, xcode="5.1.1", text="no such recipient here")
    return None


if __name__ == "__main__":
    app.run()
