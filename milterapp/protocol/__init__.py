"""The sans-IO milter protocol core: bytes in, events out; replies in, bytes out.

The rule of this package: it never imports asyncio, sockets, selectors, structlog or any
part of the application layer (``milterapp.context``, ``milterapp.app``, ``milterapp.server``
and above). It depends only on ``milterapp.errors``, the models in ``milterapp.events`` and
``milterapp.replies``, pydantic and the standard library, so it can be driven by any I/O
layer, by tests and by the MTA-side tools alike. ``tests/test_architecture.py`` enforces this.

Modules:
    constants    command and response bytes, action and protocol flags, limits
    framing      incremental packet decoder and packet encoder
    payload      the payload cursor and string helpers the codecs share
    commands     MTA commands: payloads to event models and back
    responses    milter responses: reply models to packets and back
    codec        one import for both directions (commands and responses)
    negotiation  the negotiation reply computed from the MTA's offer and the app's needs
    macros       macro tables per stage, as libmilter keeps them
    machine      MilterConnection, the milter-side connection state machine
    mta          MtaConnection, the MTA side of the same conversation

This ``__init__`` deliberately imports nothing, so that the model modules can import
``milterapp.protocol.constants`` without an import cycle.
"""
