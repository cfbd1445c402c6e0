"""Record a milter conversation through a proxy; replay it against an App and compare.

One import for the whole feature; each part lives in its own module:

- :mod:`milterapp.testing.recording`: the recording file (format, models, loader, writer);
- :mod:`milterapp.testing.recorder`: :func:`record`, the recording proxy;
- :mod:`milterapp.testing.replay`: :func:`replay`, which compares an App with a recording.
"""

from milterapp.testing.recorder import record, record_sync
from milterapp.testing.recording import (
    RECORDING_FORMAT,
    RECORDING_VERSION,
    RecordedConnection,
    RecordedPacket,
    Recording,
    RecordingError,
    load_recording,
)
from milterapp.testing.replay import ComparedAnswer, ReplayReport, replay, replay_sync

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
