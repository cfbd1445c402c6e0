"""Record a milter conversation through a proxy; replay it against an App and compare.

One import for the whole feature; each part lives in its own module:

    file      the recording file: its format, models, loader and writer
    proxy     record(): the proxy between an MTA and a milter that writes the recording
    replay    replay(): an App against a recording, answer by answer

This ``__init__`` only re-exports.
"""

from milterapp.testing.recording.file import (
    RECORDING_FORMAT,
    RECORDING_VERSION,
    RecordedConnection,
    RecordedPacket,
    Recording,
    RecordingError,
    load_recording,
)
from milterapp.testing.recording.proxy import record, record_sync
from milterapp.testing.recording.replay import ComparedAnswer, ReplayReport, replay, replay_sync

__all__ = [
    "RECORDING_FORMAT",
    "RECORDING_VERSION",
    "ComparedAnswer",
    "RecordedConnection",
    "RecordedPacket",
    "Recording",
    "RecordingError",
    "ReplayReport",
    "load_recording",
    "record",
    "record_sync",
    "replay",
    "replay_sync",
]
