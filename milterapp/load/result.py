"""What a load run is asked to do (:class:`LoadOptions`) and what it measured
(:class:`LoadResult`); :mod:`milterapp.load.generator` runs it."""

from __future__ import annotations

import dataclasses
from typing import Any

from milterapp.spec import ConnectionSpec

__all__ = ["SATURATED", "LoadOptions", "LoadResult"]

#: A generator process busy this share of the time or more (running, or waiting for a core)
#: was the limit of what it measured: the milter may serve more than it was sent.
SATURATED = 0.9


def _option(default: Any, description: str, metavar: str = "N") -> Any:
    # The help text and metavar go with the field: ``milterapp bench`` builds its flags
    # from these fields, so a default is written once.
    return dataclasses.field(default=default, metadata={"help": description, "metavar": metavar})


def _shown(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What to send, how much and for how long."""

    spec: str = dataclasses.field(metadata={"help": "the milter, e.g. inet:10025@[127.0.0.1]"})
    connections: int = _option(32, "at once")
    duration: float = _option(10.0, "seconds measured", "S")
    warmup: float = _option(1.0, "seconds not measured, first", "S")
    messages: int = _option(0, "messages in all, instead of a duration; 0 runs for the duration")
    processes: int = _option(1, "generator processes")
    messages_per_connection: int = _option(10, "then reconnect")
    recipients: int = _option(2, "per message")
    headers: int = _option(10, "per message")
    body_size: int = _option(4096, "bytes per message", "BYTES")
    timeout: float = _option(30.0, "seconds for each answer", "S")

    def __post_init__(self) -> None:
        ConnectionSpec.parse(self.spec)  # a clear error for a bad spec, before anything runs
        # Each bound written so that NaN fails it too.
        for name in ("connections", "processes", "messages_per_connection"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be at least 1, not {_shown(getattr(self, name))}")
        for name in ("duration", "warmup", "messages", "recipients", "headers", "body_size"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be at least 0, not {_shown(getattr(self, name))}")
        if not self.timeout > 0:
            raise ValueError(f"timeout: must be greater than 0, not {_shown(self.timeout)}")


@dataclasses.dataclass
class LoadResult:
    """What was measured: messages, rate, latency percentiles, and every answer by kind."""

    messages: int
    seconds: float
    latencies_ms: list[float]
    outcomes: dict[str, int]
    errors: dict[str, int]
    #: Each generator process's busy share of the measured time (running, or ready to run
    #: and waiting for a core): 1.0 is busy all the time.
    generator_busy: list[float] = dataclasses.field(default_factory=list)

    @property
    def generator_saturated(self) -> bool:
        """A generator process was busy :data:`SATURATED` of the time or more: the rate is the
        generator's limit, and the milter may serve more."""
        return any(busy >= SATURATED for busy in self.generator_busy)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def report(self, options: LoadOptions) -> str:
        """The result in a few readable lines."""
        if options.messages:
            how = f"{options.messages} messages"
        else:
            how = f"{options.duration:g} s after {options.warmup:g} s of warm-up"
        answers = ", ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items()))
        errors = ", ".join(f"{name} {count}" for name, count in sorted(self.errors.items()))
        lines = [
            f"milter    {options.spec}: {options.connections} connections, "
            f"{options.processes} process(es), {how}",
            f"messages  {self.messages} in {self.seconds:.2f} s: {self.rate:,.1f} per second",
            f"latency   p50 {self.percentile(0.5):.2f} ms, p99 {self.percentile(0.99):.2f} ms",
            f"answers   {answers or 'none'}",
            f"errors    {errors or 'none'}",
        ]
        if self.generator_busy:
            busy = ", ".join(f"{share:.0%}" for share in self.generator_busy)
            lines.append(
                f"generator busy {busy} of the time (running or waiting for a core; "
                f"{len(self.generator_busy)} process(es))"
            )
        if self.generator_saturated:
            lines.append(
                f"note      the generator was the limit (a process busy {SATURATED:.0%} of the "
                "time or more), not the milter: the milter may serve more; measure again with "
                "more --processes, with the speed extra (uvloop), or with a generator in C "
                "(docs/cli.md, milterapp bench)"
            )
        if tempfailed := self.outcomes.get("tempfail", 0):
            lines.append(
                f"note      {tempfailed} of {self.messages} messages were tempfailed: a milter "
                "whose handlers fail answers TempFail (fail closed); see its log"
            )
        return "\n".join(lines)

    @property
    def all_tempfailed(self) -> bool:
        """Every message measured was tempfailed (a failing milter looks like that)."""
        return bool(self.messages) and self.outcomes.get("tempfail", 0) == self.messages

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "outcomes": dict(sorted(self.outcomes.items())),
            "errors": dict(sorted(self.errors.items())),
            "generator_busy": [round(busy, 3) for busy in self.generator_busy],
            "generator_saturated": self.generator_saturated,
        }
