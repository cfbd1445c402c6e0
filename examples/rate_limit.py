"""Limit how many messages one client address may send per minute.

Counts live in the app (one process); ``ctx.state`` counts per connection and
``ctx.message`` per message. For several milter processes or hosts, keep the counts in a
shared store instead (see greylist.py for Redis).
Run: ``python examples/rate_limit.py [--spec SPEC]``.
"""

import time
from collections import defaultdict, deque

from milterapp import App, Connect, Context, EnvFrom, TempFail

LIMIT = 30
WINDOW = 60.0

app = App("rate-limit")
recent: defaultdict[str, deque[float]] = defaultdict(deque)


@app.on("connect")
def remember_client(event: Connect, ctx: Context) -> None:
    ctx.state["client"] = str(event.address or event.hostname)
    ctx.state["messages"] = 0


@app.on("envfrom")
def limit(event: EnvFrom, ctx: Context) -> TempFail | None:
    client = ctx.state.get("client", ctx.peer)
    now = time.monotonic()
    times = recent[client]
    while times and now - times[0] > WINDOW:
        times.popleft()
    if len(times) >= LIMIT:
        ctx.log.info("rate_limited", client=client, count=len(times))
        return TempFail(code=450, xcode="4.7.1", text="too many messages, slow down")
    times.append(now)
    ctx.state["messages"] = ctx.state.get("messages", 0) + 1
    return None


if __name__ == "__main__":
    app.run()
