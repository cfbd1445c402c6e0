"""Refuse oversized messages and executable attachments.

The size comes from the client's ``SIZE=`` at MAIL FROM when given (refused before any data is
sent), and is checked again on the data itself. Attachments are found with the standard
``email`` package on the whole message, which milterapp keeps (spooled to disk when large).
Run: ``python examples/attachments.py [--spec SPEC]``.
"""

from milterapp import App, Context, EndOfMessage, EnvFrom, Reject

MAX_SIZE = 10 * 1024 * 1024
EXECUTABLE = (".exe", ".scr", ".bat", ".cmd", ".com", ".js", ".vbs", ".jar", ".msi", ".ps1")

app = App("attachments", keep_message=True)


@app.on("envfrom")
def announced_size(event: EnvFrom) -> Reject | None:
    size = event.args.get("SIZE")
    if size is not None and size.isdigit() and int(size) > MAX_SIZE:
        return Reject(code=552, xcode="5.3.4", text="message too big for this system")
    return None


@app.on("eom")
def check_content(event: EndOfMessage, ctx: Context) -> Reject | None:
    if ctx.message.body_size > MAX_SIZE:
        return Reject(code=552, xcode="5.3.4", text="message too big for this system")
    for part in ctx.message.as_email().iter_attachments():
        filename = (part.get_filename() or "").lower()
        if filename.endswith(EXECUTABLE):
            ctx.log.info("executable_refused", filename=filename)
            return Reject(code=550, xcode="5.7.1", text=f"executable attachment {filename} refused")
    return None


if __name__ == "__main__":
    app.run()
