"""Limit how many messages one client address may send per minute.

Counts live in the app (one process), by client address; ``ctx.state`` counts the messages
of each connection. For several milter processes or hosts, keep the counts in a shared store
instead (see greylist.py for Redis).
Run: ``python examples/rate_limit.py [--spec SPEC]``.
"""

import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from milterapp import App, Context, EnvFrom, TempFail

LIMIT = 30
WINDOW = 60.0


@dataclass
class Session:
    """One SMTP session: how many messages it sent."""

    messages: int = 0


app = App("rate-limit", connection_state=Session)
recent: defaultdict[str, deque[float]] = defaultdict(deque)


@app.on("envfrom")
def limit(event: EnvFrom, ctx: Context[Any, Session]) -> TempFail | None:
    client = str(ctx.client.address or ctx.client.hostname)
    now = time.monotonic()
    times = recent[client]
    while times and now - times[0] > WINDOW:
        times.popleft()
    if len(times) >= LIMIT:
        ctx.log.info("rate_limited", count=len(times), session_messages=ctx.state.messages)
        return TempFail(code=450, xcode="4.7.1", text="too many messages, slow down")
    times.append(now)
    ctx.state.messages += 1
    return None


if __name__ == "__main__":
    app.run()
