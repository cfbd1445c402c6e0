"""milterapp beside pymilter and purepythonmilter: one table of msgs/s, latency and memory.

Each implementation serves the same reference milter (bench/refmilter.py,
bench/peers/*_ref.py) in turn; the same load generator drives each for the same time. With two
or more cores the milter is pinned to core 0 and the generator to core 1 (``--no-pin`` to
leave them free). The generator is ``milterapp bench`` unless ``--c-loadgen PATH`` names the
shared C one (``make -C ../shared/bench``). Peers come from ``bench/setup-peers.sh``; a peer
that is not installed is skipped with a note.

Each scenario gives one table. By default two: ``main`` (32 connections, 10 messages each,
4 KiB bodies) and ``one-per-connection`` (the same, one message per connection, as Postfix
opens a milter connection per SMTP session); ``--scenario NAME`` picks others (repeatable:
``main``, ``one-per-connection``, ``many-connections``, ``large-bodies``, ``eom-only``), and
``--connections``, ``--body-size``, ``--messages-per-connection`` or ``--eom-only`` alone
describe a single scenario of one's own (given with ``--scenario``, they apply to each).

Run: ``python bench/compare.py [--scenario NAME] [--duration 10] [--body-size 4096]
[--connections 32] [--eom-only] [--workers N] [--c-loadgen PATH] [--quickack] [--rounds N]
[--only WORD] [--python PATH[=LABEL]]``. ``--python`` adds the milterapp build of another
interpreter, so that the compiled and the pure-Python builds are measured in one run
(docs/performance.md); a label tells apart environments of one build (``--python
before/.venv/bin/python=before``; naming the running interpreter this way labels its rows
too). Compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import milterapp

#: The milterapp build measured: the one this interpreter imports (README, "Compiled build").
BUILD = "compiled" if milterapp.COMPILED else "pure"

HERE = Path(__file__).resolve().parent
PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"
LIBMILTER_REF = HERE / ".venv-peers" / "bin" / "libmilter_ref"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the milter exited with status {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # a benchmark harness polling for start-up, not a test
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def peak_rss_mib(pid: int) -> float:
    total = 0
    for child in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its workers), in the order they were started."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return sorted(int(child) for child in text.split())


@functools.cache
def build_of(python: str) -> str:
    """Which milterapp build ``python`` imports: "compiled" (mypyc) or "pure"."""
    if python == sys.executable:
        return BUILD
    probe = "import milterapp; print('compiled' if milterapp.COMPILED else 'pure')"
    # From bench/, as the milter runs: the interpreter's own milterapp, not this checkout's.
    found = subprocess.run(  # noqa: S603 - an interpreter named on our command line
        [python, "-c", probe], capture_output=True, text=True, check=True, cwd=HERE
    )
    return found.stdout.strip()


#: The load's shape, as each scenario gives it; options given on the command line win.
SHAPE: dict[str, object] = {
    "connections": 32,
    "body_size": 4096,
    "messages_per_connection": 10,
    "eom_only": False,
}
SCENARIOS: dict[str, dict[str, object]] = {
    "main": {},
    "one-per-connection": {"messages_per_connection": 1},
    "many-connections": {"connections": 500},
    "large-bodies": {"body_size": 1024 * 1024},
    "eom-only": {"eom_only": True},
}
DEFAULT_SCENARIOS = ("main", "one-per-connection")


def scenarios(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """Each scenario to measure, with the options that describe its load."""
    given = {key: getattr(args, key) for key in SHAPE if getattr(args, key) is not None}
    names = args.scenario or ([] if given else list(DEFAULT_SCENARIOS))
    if not names:  # a shape of one's own
        return [("custom", argparse.Namespace(**{**vars(args), **SHAPE, **given}))]
    return [
        (name, argparse.Namespace(**{**vars(args), **SHAPE, **SCENARIOS[name], **given}))
        for name in names
    ]


def commands(port: int, args: argparse.Namespace) -> dict[str, list[str]]:
    eom = ["--eom-only"] if args.eom_only else []
    spec = f"inet:{port}@127.0.0.1"
    found: dict[str, list[str]] = {}
    # Absolute (not resolved: a venv's python is a symlink that must stay one). A label
    # (PATH=LABEL) tells apart two environments of the same build, say before and after.
    named = [(sys.executable, "")] + [
        (os.path.abspath(path), label) for path, _, label in (p.partition("=") for p in args.python)
    ]
    for python, label in dict(named).items():
        build = f"{build_of(python)} {label}".strip()
        milter = [python, str(HERE / "refmilter.py"), spec]
        found[f"milterapp ({build}, uvloop)"] = [*milter, "--loop", "uvloop", *eom]
        found[f"milterapp ({build}, asyncio)"] = [*milter, "--loop", "asyncio", *eom]
        if args.workers > 1:
            found[f"milterapp ({build}), {args.workers} workers"] = [
                *milter,
                "--workers",
                str(args.workers),
                *eom,
            ]
    if LIBMILTER_REF.exists():
        found["libmilter (C)"] = [str(LIBMILTER_REF), spec, *eom]
    if PEERS_PYTHON.exists():
        found["pymilter"] = [str(PEERS_PYTHON), str(HERE / "peers" / "pymilter_ref.py"), spec, *eom]
        found["purepythonmilter"] = [
            str(PEERS_PYTHON),
            str(HERE / "peers" / "purepythonmilter_ref.py"),
            str(port),
            *eom,
        ]
    elif port == 0:
        print("note: peers not installed (bench/setup-peers.sh); measuring milterapp only")
    return found


def load(port: int, args: argparse.Namespace, pin: list[str]) -> dict[str, float]:
    spec = f"inet:{port}@127.0.0.1"
    if args.c_loadgen:
        command = [
            args.c_loadgen,
            "-s",
            spec,
            "-c",
            str(args.connections),
            "-d",
            str(args.duration),
            "-w",
            str(args.warmup),
            "-b",
            str(args.body_size),
            "-m",
            str(args.messages_per_connection),
            "-q",
            *(["--quickack"] if args.quickack else []),
        ]
        run = subprocess.run(pin + command, capture_output=True, text=True, check=False)  # noqa: S603
        output = run.stdout
        line = next((x for x in output.splitlines() if x.startswith("RESULT")), "")
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        return {
            "rate": float(fields.get("rate", 0)),
            "p50": float(fields.get("p50_ms", 0)),
            "p99": float(fields.get("p99_ms", 0)),
            "errors": float(fields.get("errors", 0)),
        }
    command = [
        sys.executable,
        "-m",
        "milterapp",
        "bench",
        "--spec",
        spec,
        "--json",
        "--connections",
        str(args.connections),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--body-size",
        str(args.body_size),
        "--processes",
        str(args.processes),
        "--messages-per-connection",
        str(args.messages_per_connection),
    ]
    run = subprocess.run(pin + command, capture_output=True, text=True, check=False)  # noqa: S603
    summary = json.loads(run.stdout or "{}")
    return {
        "rate": summary.get("rate", 0.0),
        "p50": summary.get("p50_ms", 0.0),
        "p99": summary.get("p99_ms", 0.0),
        "errors": float(sum(summary.get("errors", {}).values())),
    }


def measure(name: str, args: argparse.Namespace, *, pinning: bool) -> dict[str, float] | None:
    """One run of one implementation: start it, load it, stop it."""
    port = free_port()
    command = commands(port, args)[name]
    # Workers are meant to use every core: only a single process is pinned.
    milter_pin = ["taskset", "-c", "0"] if pinning and "workers" not in name else []
    load_pin = ["taskset", "-c", "1"] if pinning and "workers" not in name else []
    # The milter's stderr is kept aside: peers' shutdown noise (purepythonmilter prints a
    # traceback) is not a figure, but it is shown when the milter could not be measured.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(  # noqa: S603
            milter_pin + command, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            wait_listening(port, process)
            figures = load(port, args, load_pin)
            figures["rss"] = peak_rss_mib(process.pid)
        except RuntimeError as exc:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            print(f"note: {name} could not be measured: {exc}\n{tail}")
            return None
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return figures


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="a named load (repeatable); default: " + " and ".join(DEFAULT_SCENARIOS),
    )
    parser.add_argument("--connections", type=int, help="concurrent connections (32)")
    parser.add_argument("--body-size", type=int, help="bytes of body per message (4096)")
    parser.add_argument(
        "--messages-per-connection",
        type=int,
        metavar="N",
        help="messages before the generator quits and connects again (10; Postfix: 1 per "
        "SMTP session)",
    )
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--workers", type=int, default=1, help="also measure N workers")
    parser.add_argument(
        "--eom-only", action="store_true", default=None, help="an end-of-message handler only"
    )
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each N times, in turn; print medians"
    )
    parser.add_argument("--c-loadgen", help="path of the shared C load generator")
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH[=LABEL]",
        help="also measure the milterapp build of this interpreter (repeatable), e.g. a "
        "pure-Python venv beside a compiled one; LABEL names its rows (before, after)",
    )
    parser.add_argument(
        "--quickack",
        action="store_true",
        help="C generator: acknowledge replies at once (no delayed ACKs)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="WORD",
        help="measure only implementations whose name contains WORD (repeatable)",
    )
    args = parser.parse_args()
    pinning = bool(not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"))
    for name, scenario in scenarios(args):
        table(name, scenario, pinning=pinning)


def table(scenario: str, args: argparse.Namespace, *, pinning: bool) -> None:
    """Measure every implementation under one scenario; print its table."""
    names = [
        name
        for name in commands(0, args)
        if not args.only or any(word in name for word in args.only)
    ]
    # Rounds go through every implementation in turn, so that a slow spell of a shared
    # machine falls on all of them; each figure is the median of its rounds.
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            figures = measure(name, args, pinning=pinning)
            if figures is not None:
                runs[name].append(figures)
    rows = [(name, _median(found)) for name, found in runs.items() if found]
    base = next((f["rate"] for n, f in rows if n.startswith("milterapp")), 0.0) or 1.0
    libmilter = next((f["rate"] for n, f in rows if n.startswith("libmilter")), 0.0)
    print(
        f"\n{scenario}: {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores, "
        f"{args.connections} connections, {args.body_size}-byte bodies, "
        f"{args.messages_per_connection} message(s) per connection"
        f"{', end-of-message-only app' if args.eom_only else ''}, "
        f"{'pinned' if pinning else 'unpinned'}, generator: "
        f"{'C loadgen' if args.c_loadgen else 'milterapp bench'}"
        f"{' (quick ACKs)' if args.quickack else ''}"
        f"{f', median of {args.rounds} rounds' if args.rounds > 1 else ''}\n"
    )
    extra = " vs libmilter |" if libmilter else ""
    print(
        f"| {'implementation':<38} | msgs/s | p50 ms | p99 ms | peak RSS MiB | errors | ratio |"
        + extra
    )
    print(
        f"|{'-' * 40}|-------:|-------:|-------:|-------------:|-------:|------:|"
        + ("------------:|" if libmilter else "")
    )
    for name, f in rows:
        versus = f" {f['rate'] / libmilter:11.2f} |" if libmilter else ""
        print(
            f"| {name:<38} | {f['rate']:6,.0f} | {f['p50']:6.1f} | {f['p99']:6.1f} | "
            f"{f['rss']:12.1f} | {f['errors']:6.0f} | {f['rate'] / base:5.2f} |" + versus
        )


if __name__ == "__main__":
    main()
