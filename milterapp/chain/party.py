"""An upstream milter registered in an App: where it listens, when it applies, its health.

:class:`UpstreamMilter` is what ``app.use_milter()`` registers. It lives as long as the app
and is shared by every MTA connection: each takes a connection to the upstream from it
(:meth:`UpstreamMilter.connect`) and gives it back at the end (:meth:`UpstreamMilter.release`).

- **Back-off.** After a failure the upstream is not tried again at once: the next attempt
  waits :data:`FIRST_RETRY` seconds, doubling after each failure up to :data:`LAST_RETRY`;
  meanwhile every connection gets its failure policy without waiting for a connect timeout.
  One success resets it.
- **Reuse.** A connection whose session ended cleanly is kept, after QUIT_NC, for the next
  MTA connection that makes the same offer (at most :data:`IDLE_KEPT` of them), so that
  Postfix's one message per connection does not cost the upstream a connect and a
  negotiation each time. Only version 6 upstreams are kept (libmilter since 8.14 takes
  QUIT_NC); ``reuse=False`` turns it off for an upstream that does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from milterapp.chain.options import UpstreamFailure, UpstreamOptions
from milterapp.chain.upstream import UpstreamConnection
from milterapp.events import Negotiate

__all__ = ["FIRST_RETRY", "IDLE_KEPT", "LAST_RETRY", "UpstreamMilter"]

#: Seconds before the first retry of a failed upstream, and the most it grows to.
FIRST_RETRY: Final = 1.0
LAST_RETRY: Final = 60.0
#: Idle connections kept per upstream for reuse.
IDLE_KEPT: Final = 32

#: A condition: called with the context, true when the upstream applies.
Condition = Callable[[Any], object]


class UpstreamMilter:
    """An upstream milter of an App; see the module docstring.

    Args:
        options: where it listens, its deadlines and its failure policy.
        when: the condition under which it applies (None: always), asked at ``when_at``.
        when_at: the stage whose facts the condition reads: ``connect``, ``helo``,
            ``envfrom`` (the default) or ``data``.
        reuse: keep connections for reuse across MTA connections (QUIT_NC).
        clock: the monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        options: UpstreamOptions,
        *,
        when: Condition | None = None,
        when_at: str = "envfrom",
        reuse: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.when = when
        self.when_at = when_at
        self.reuse = reuse
        self._clock = clock
        self.failures = 0  # in a row
        self._retry_at = 0.0
        self._last_failure: UpstreamFailure | None = None
        self._idle: list[tuple[tuple[int, int, int], UpstreamConnection]] = []

    def __repr__(self) -> str:
        return f"<UpstreamMilter {self.name!r} at {self.options.spec}>"

    @property
    def name(self) -> str:
        """Its name in logs and failures."""
        return self.options.name

    # --- health ------------------------------------------------------------------------

    def retry_in(self) -> float:
        """Seconds until a connection may be tried again (0: now)."""
        return max(0.0, self._retry_at - float(self._clock()))

    def failed(self, failure: UpstreamFailure) -> float:
        """Record a failure; return the seconds until the next attempt."""
        self.failures += 1
        self._last_failure = failure
        delay: float = min(FIRST_RETRY * 2.0 ** (self.failures - 1), LAST_RETRY)
        self._retry_at = self._clock() + delay
        return delay

    def succeeded(self) -> None:
        """A connection was made: the back-off starts over."""
        self.failures = 0
        self._retry_at = 0.0

    # --- connections -------------------------------------------------------------------

    async def connect(self, offer: Negotiate) -> UpstreamConnection:
        """A negotiated connection for ``offer``: a kept one (which waits for a CONNECT, as
        after QUIT_NC), or a new one.

        Raises:
            UpstreamFailure: it cannot be had now; while backing off, at once (``kind`` is
                the last failure's).
        """
        key = _key(offer)
        while self._idle:
            idle_key, link = self._idle.pop()
            if idle_key == key and link.alive:
                return link
            await link.close()
        wait = self.retry_in()
        if wait > 0 and self._last_failure is not None:
            last = self._last_failure
            detail = f"not retried for {wait:.1f} s after: {last.detail}"
            raise UpstreamFailure(self.name, last.kind, detail)
        try:
            link = await UpstreamConnection.open(self.options, offer)
        except UpstreamFailure as failure:
            self.failed(failure)
            raise
        self.succeeded()
        return link

    async def release(self, link: UpstreamConnection, offer: Negotiate) -> None:
        """Take back a connection whose session is over: kept for reuse, or closed."""
        if self.reuse and len(self._idle) < IDLE_KEPT and await link.recycle():
            self._idle.append((_key(offer), link))
        else:
            await link.close()

    async def close_idle(self) -> None:
        """Close the connections kept for reuse (the app shuts down)."""
        idle, self._idle = self._idle, []
        for _, link in idle:
            await link.close()


def _key(offer: Negotiate) -> tuple[int, int, int]:
    return (offer.version, int(offer.actions), int(offer.protocol))
