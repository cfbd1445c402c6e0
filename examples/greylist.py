"""Greylisting with shared state in Redis, so that several milter hosts agree.

A first attempt from an unknown (client address, sender, recipient) triplet is tempfailed;
a retry after ``DELAY`` seconds is accepted, and the triplet is then known for ``KEEP``
seconds. Redis keeps the triplets (redis-py's asyncio client; ``pip install redis``).
Run: ``REDIS_URL=redis://localhost:6379/0 python examples/greylist.py [--spec SPEC]``.
"""

import os
import time

import redis.asyncio as redis

from milterapp import App, Context, EnvRcpt, TempFail

DELAY = 300
KEEP = 36 * 24 * 3600

app = App("greylist")
store: redis.Redis = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


@app.on_shutdown
async def close_store() -> None:
    await store.aclose()


@app.on("envrcpt")
async def greylist(event: EnvRcpt, ctx: Context) -> TempFail | None:
    client = ctx.client.address or ctx.client.hostname
    key = f"greylist:{client}:{ctx.message.sender.address.lower()}:{event.address.lower()}"
    now = int(time.time())
    first_seen = await store.get(key)
    if first_seen is None:
        await store.set(key, now, ex=KEEP)
        return TempFail(code=451, xcode="4.7.1", text="greylisted, please try again later")
    if now - int(first_seen) < DELAY:
        return TempFail(code=451, xcode="4.7.1", text="greylisted, please try again later")
    await store.expire(key, KEEP)
    return None


if __name__ == "__main__":
    app.run()
