"""Instructions per message, counted with callgrind: figures that do not move with the machine.

Timings on a shared machine vary between rounds by more than many changes are worth; an
instruction count of the same program on the same input varies by about 0.5 %. For each
interpreter named (each its own milterapp build, ``PATH[=LABEL]``), two measures:

* ``handler``: ``bench/handler_bench.py`` (the framework's Python per message, no sockets) for
  each of its apps;
* ``server``: the reference milter (``bench/refmilter.py``, uvloop) as a server, loaded by the
  shared C generator one connection at a time (so that the event loop's batching does not
  depend on timing), with 10 messages per connection, 1, and the end-of-message-only app.

Each figure is the difference between a run of N and one of 3N messages, divided by 2N, so
that start-up costs cancel. Needs valgrind. Run: ``python bench/instructions.py
[--measure handler|server] [--c-loadgen PATH] [--messages N] PYTHON[=LABEL] ...``; several
interpreters are measured two at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SUMMARY = re.compile(rb"^summary: (\d+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def callgrind(command: list[str], out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]


def summary(out: Path) -> int:
    found = _SUMMARY.search(out.read_bytes())
    if found is None:
        raise RuntimeError(f"no callgrind summary in {out}")
    return int(found.group(1))


def handler_run(python: str, app: str, messages: int, *, work: Path) -> int:
    out = work / f"handler-{app}-{messages}.cg"
    bench = [python, str(HERE / "handler_bench.py"), "--rounds", "1", "--app", app]
    command = callgrind([*bench, "--transactions", str(messages)], out)
    subprocess.run(command, check=True, capture_output=True, cwd=tempfile.gettempdir())  # noqa: S603
    return summary(out)


def server_run(
    python: str, loadgen: str, per_connection: int, extra: list[str], messages: int, work: Path
) -> int:
    port = free_port()
    out = work / f"server-{per_connection}-{'-'.join(extra)}-{messages}.cg"
    milter = [python, str(HERE / "refmilter.py"), f"inet:{port}@[127.0.0.1]", "--loop", "uvloop"]
    server = subprocess.Popen(  # noqa: S603 - interpreters named on our command line
        callgrind([*milter, *extra], out),
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the milter did not start under valgrind")
            time.sleep(0.5)  # a harness waiting for start-up, not a test
        subprocess.run(  # noqa: S603
            [
                loadgen,
                "-s",
                f"inet:{port}@127.0.0.1",
                "-c",
                "1",
                "-m",
                str(per_connection),
                "-n",
                str(messages),
                "-t",
                "120",
                "-q",
                "--quickack",
            ],
            check=True,
            capture_output=True,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=600)
    return summary(out)


def per_message(run: Callable[[int], int], messages: int) -> int:
    """Instructions per message: the run of 3N messages less the run of N, over 2N."""
    return (run(3 * messages) - run(messages)) // (2 * messages)


def measure(
    python: str, label: str, what: list[str], loadgen: str | None, messages: int
) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="instructions-") as name:
        work = Path(name)
        if "handler" in what:
            for app in ("plain", "async", "eom"):
                figure = per_message(
                    functools.partial(handler_run, python, app, work=work), messages
                )
                lines.append(f"{label:24} handler {app:28} {figure:>12,}")
        if "server" in what and loadgen:
            for per_connection, extra, scenario in (
                (10, [], "10 messages per connection"),
                (1, [], "1 message per connection"),
                (10, ["--eom-only"], "end-of-message only"),
            ):
                run = functools.partial(
                    server_run, python, loadgen, per_connection, extra, work=work
                )
                figure = per_message(run, messages)
                lines.append(f"{label:24} server  {scenario:28} {figure:>12,}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pythons", nargs="+", metavar="PYTHON[=LABEL]")
    parser.add_argument("--measure", choices=("handler", "server"), action="append")
    parser.add_argument("--c-loadgen", help="the shared C load generator (server measure)")
    parser.add_argument("--messages", type=int, default=100, help="N: runs of N and 3N (100)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    what = args.measure or ["handler", "server"]
    if "server" in what and not args.c_loadgen:
        print("note: no --c-loadgen: the server measure is skipped")
    named = [item.partition("=") for item in args.pythons]
    print(f"instructions per message (runs of {args.messages} and {3 * args.messages})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        jobs = [
            pool.submit(
                measure, os.path.abspath(path), label or path, what, args.c_loadgen, args.messages
            )
            for path, _, label in named
        ]
        for job in jobs:
            print("\n".join(job.result()))


if __name__ == "__main__":
    main()
