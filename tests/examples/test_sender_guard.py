"""examples/sender_guard.py, driven over a real socket like an MTA would."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from milterapp import (
    AddHeader,
    Connect,
    Continue,
    EndOfMessage,
    EnvFrom,
    Helo,
    MilterServer,
    Reject,
)
from milterapp.protocol.mta import Answer
from milterapp.testing import MtaClient

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sender_guard.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sender_guard_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(spec.name, None)
    spec.loader.exec_module(module)
    return module


async def exchange() -> tuple[Answer | None, Answer | None, Answer | None]:
    example = load_example()
    server = MilterServer(example.app, spec="inet:0@[127.0.0.1]")
    await server.start()
    try:
        async with await MtaClient.connect(server.address) as client:
            await client.negotiate()
            await client.send(Connect(hostname="client.example", family="U"))
            await client.send(Helo(name="client.example"))
            blocked = await client.send(EnvFrom(address="blocked@example.com"))
            allowed = await client.send(EnvFrom(address="alice@example.org"))
            end = await client.send(EndOfMessage())
        return blocked, allowed, end
    finally:
        server.request_stop()
        await server.close()


def test_sender_guard_rejects_blocked_sender_and_stamps_the_rest() -> None:
    blocked, allowed, end = asyncio.run(asyncio.wait_for(exchange(), 20))
    assert blocked is not None
    assert blocked.verdict == Reject(code=550, xcode="5.7.1", text="sender blocked")
    assert allowed is not None
    assert allowed.verdict == Continue()
    assert end is not None
    assert end.modifications == [AddHeader(name="X-Checked-By", value="sender-guard")]
    assert end.verdict == Continue()
