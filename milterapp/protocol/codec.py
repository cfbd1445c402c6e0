"""Payloads to models and models to packets, in both directions (one import for both).

Commands (what the MTA sends) live in :mod:`milterapp.protocol.commands`, responses (what the
milter sends) in :mod:`milterapp.protocol.responses`. The milter side decodes commands and
encodes responses; the MTA side (the testing kit, the load generator) does the reverse.
"""

from __future__ import annotations

from milterapp.protocol.commands import decode_command, encode_command
from milterapp.protocol.responses import decode_response, encode_response, split_body

__all__ = [
    "decode_command",
    "decode_response",
    "encode_command",
    "encode_response",
    "split_body",
]
