"""What one milterapp server process holds in memory: at start-up, and after some messages.

Starts the reference milter (bench/refmilter.py; ``--app eom-only`` for its end-of-message-only
variant; ``--app add-header`` for examples/add_header.py, ``add-header-cli`` for the same
served by ``milterapp run``; ``--app floor`` for a bare asyncio server with milterapp's
dependencies and none of its code), waits until it listens and every worker is up, reads each
process's memory, sends messages through it, and reads it again. The messages come from the C
load generator if ``--c-loadgen PATH`` names it, else from ``milterapp bench``. Per process
(the parent, then each worker):

- VmRSS, RssAnon, RssFile (/proc/PID/status): resident memory, what ``ps`` and ``top`` show;
- Pss and USS (/proc/PID/smaps_rollup): the process's share of pages it shares with others,
  and the pages only it holds. Forked workers share the parent's pages until they write to
  them: their USS is what each worker adds.

``--breakdown`` runs the server twice more (one process): once under ``-X importtime``, which
modules its start-up imported and how long each package took; once with tracemalloc on, what
each module's import left allocated (its code, its classes, the pydantic schemas of its
models), by package and by module. tracemalloc holds memory of its own: the tables' RSS
figures come from the untraced runs only.

``--source DIR`` puts DIR first on the server's PYTHONPATH, to measure another checkout
(``git archive HEAD | tar -x -C /tmp/before``) with the same interpreter.

Run: ``python bench/memory.py [--workers 1 2 4] [--app refmilter|eom-only|add-header|...]
[--messages 2000] [--connections 4] [--c-loadgen PATH] [--loop auto|asyncio|uvloop]
[--breakdown] [--top 25] [--source DIR]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare import children, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLUMNS = ("VmRSS", "RssAnon", "RssFile", "Pss", "USS")
#: The line the traced server prints its findings after (``--breakdown``).
_MARK = "MEMORY-BREAKDOWN "
#: ``--app floor``: what milterapp's dependencies cost before any of its code, a bare asyncio
#: server (uvloop's when installed, unless ``asyncio``) with structlog and one pydantic model
#: built and used. It speaks no milter: no messages are sent to it.
FLOOR = """
import argparse, asyncio, sys
import structlog
from pydantic import BaseModel

class Event(BaseModel):
    size: int

Event(size=1)
port, loop = int(sys.argv[1]), sys.argv[2]

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)

async def main():
    await asyncio.start_server(echo, "127.0.0.1", port)
    structlog.get_logger().info("listening", port=port)
    await asyncio.Event().wait()

if loop != "asyncio":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, Pss and USS of a process, in MiB."""
    kib: dict[str, int] = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                kib[key] = int(value.split()[0])
    kib["USS"] = kib["Private_Clean"] + kib["Private_Dirty"]
    return {column: kib[column] / 1024 for column in COLUMNS}


def server_command(args: argparse.Namespace, port: int, workers: int) -> list[str]:
    spec = f"inet:{port}@127.0.0.1"
    options = ["--workers", str(workers), "--loop", args.loop]
    if args.app == "floor":
        return [sys.executable, "-c", FLOOR, str(port), args.loop]
    example = str(ROOT / "examples" / "add_header.py")
    if args.app == "add-header":
        return [sys.executable, example, "--spec", spec, *options]
    if args.app == "add-header-cli":
        return [sys.executable, "-m", "milterapp", "run", example, "--spec", spec, *options]
    eom = ["--eom-only"] if args.app == "eom-only" else []
    return [sys.executable, str(HERE / "refmilter.py"), spec, *eom, *options]


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(args.source).resolve()), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


def cwd(args: argparse.Namespace) -> Path:
    """Where the server starts: ``python -m`` imports from there first."""
    return Path(args.source).resolve() if args.source else ROOT


def wait_ready(port: int, process: subprocess.Popen[bytes], workers: int) -> None:
    """Until the port accepts, every worker is forked, and no process's memory moves."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the milter exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the milter did not start within 60 s")
        with socket.socket() as probe:
            listening = probe.connect_ex(("127.0.0.1", port)) == 0
        if listening and (workers == 1 or len(children(process.pid)) == workers):
            break
        time.sleep(0.05)  # a harness polling for start-up
    # Workers finish their start-up after the fork; the figures settle once they serve.
    last: list[dict[str, float]] = []
    steady = 0
    while steady < 5 and time.monotonic() < deadline:
        now = [memory(pid) for pid in [process.pid, *children(process.pid)]]
        steady = steady + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def send_messages(args: argparse.Namespace, port: int) -> str:
    spec = f"inet:{port}@127.0.0.1"
    if args.c_loadgen:
        command = [args.c_loadgen, "-s", spec, "-c", str(args.connections)]
        command += ["-n", str(args.messages), "-q"]
    else:
        command = [sys.executable, "-m", "milterapp", "bench", "--spec", spec, "--json"]
        command += ["--connections", str(args.connections), "--messages", str(args.messages)]
        command += ["--warmup", "0"]
    run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)  # noqa: S603
    if run.returncode:
        raise RuntimeError(f"the load generator failed: {run.stdout}{run.stderr}")
    if args.c_loadgen:
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT")), "")
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        return f"{fields.get('rate', '?')} msgs/s, {fields.get('errors', '?')} errors"
    summary = json.loads(run.stdout)
    errors = sum(summary.get("errors", {}).values())
    return f"{summary.get('rate', 0):.0f} msgs/s, {errors} errors"


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _table(title: str, roles: list[tuple[str, int]], figures: dict[int, dict[str, float]]) -> None:
    print(f"  {title:<10} {'pid':>7} " + "".join(f"{column:>9}" for column in COLUMNS))
    for role, pid in roles:
        cells = "".join(f"{figures[pid][column]:>9.1f}" for column in COLUMNS)
        print(f"  {role:<10} {pid:>7} {cells}")


def measure(args: argparse.Namespace, workers: int) -> None:
    port = free_port()
    command = server_command(args, port, workers)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(  # noqa: S603
            command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment(args), cwd=cwd(args)
        )
        try:
            wait_ready(port, process, workers)
            roles = [("parent" if workers > 1 else "server", process.pid)]
            roles += [(f"worker {n}", pid) for n, pid in enumerate(children(process.pid), 1)]
            before = {pid: memory(pid) for _, pid in roles}
            if args.app == "floor":
                outcome = "not sent: the floor speaks no milter"
            else:
                outcome = send_messages(args, port)
            time.sleep(0.3)
            after = {pid: memory(pid) for _, pid in roles}
        except RuntimeError as exc:
            stderr.seek(0)
            print(f"error: {exc}\n{stderr.read().decode(errors='replace')[-2000:]}")
            raise SystemExit(1) from None
        finally:
            stop(process)
    if args.app == "floor":
        print(f"\nthe floor, MiB ({outcome})")
    else:
        print(
            f"\nworkers={workers}, MiB; then {args.messages} messages over "
            f"{args.connections} connections ({outcome})"
        )
    _table("start-up", roles, before)
    _table("after", roles, after)


# --- --breakdown ----------------------------------------------------------------------------


def _package(name: str) -> str:
    """The package a module counts under: milterapp's subpackages apart."""
    parts = name.split(".")
    if parts[0] == "milterapp" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def traced_server() -> None:
    """Inside the traced server (``--breakdown``): note what each import leaves allocated,
    serve, and on a line on stdin print it with the modules imported."""
    import runpy
    import threading
    import tracemalloc

    tracing = os.environ.get("MEMORY_BENCH_TRACE") == "1"
    cumulative: dict[str, int] = {}
    own: dict[str, int] = {}
    stack: list[list[int]] = []  # per import under way: what its own imports took
    # What every import statement runs to load a module (importlib's frozen bootstrap).
    bootstrap: Any = sys.modules["_frozen_importlib"]
    load = bootstrap._load_unlocked

    def measured_load(spec: Any) -> Any:
        start = tracemalloc.get_traced_memory()[0]
        stack.append([0])
        try:
            return load(spec)
        finally:
            nested = stack.pop()[0]
            took = tracemalloc.get_traced_memory()[0] - start
            cumulative[spec.name] = took
            own[spec.name] = took - nested
            if stack:
                stack[-1][0] += took

    if tracing:
        tracemalloc.start()
        bootstrap._load_unlocked = measured_load
    script = sys.argv[2]
    sys.argv = sys.argv[2:]

    def report() -> None:
        while sys.stdin.readline():
            found = {
                "modules": sorted(sys.modules),
                "own": own,
                "cumulative": cumulative,
                "traced": tracemalloc.get_traced_memory()[0] if tracing else 0,
            }
            print(_MARK + json.dumps(found), flush=True)

    threading.Thread(target=report, daemon=True).start()
    runpy.run_path(script, run_name="__main__")


def _traced_run(
    args: argparse.Namespace, *, trace: bool
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Start the server traced; its report at start-up and after the messages, and its
    stderr."""
    port = free_port()
    command = server_command(args, port, 1)
    python = [command[0], *(["-X", "importtime"] if not trace else [])]
    env = environment(args) | {"MEMORY_BENCH_TRACE": "1" if trace else "0"}
    process = subprocess.Popen(  # noqa: S603
        [*python, __file__, "--traced-server", *command[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd(args),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stdin, stdout = process.stdin, process.stdout

    def report() -> dict[str, Any]:
        stdin.write(b"report\n")
        stdin.flush()
        line = stdout.readline().decode()
        found: dict[str, Any] = json.loads(line.removeprefix(_MARK))
        return found

    try:
        wait_ready(port, process, 1)
        at_start = report()
        send_messages(args, port)
        after = report()
    finally:
        stop(process)
    return at_start, after, process.stderr.read().decode(errors="replace")


def breakdown(args: argparse.Namespace) -> None:
    if args.app in {"add-header-cli", "floor"}:
        raise SystemExit(f"--breakdown runs a milter script: not --app {args.app}")
    found, after, imports = _traced_run(args, trace=False)
    micros: dict[str, int] = {}
    for match in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", imports):
        micros[match.group(2)] = int(match.group(1))
    modules: list[str] = found["modules"]
    traced, _, _ = _traced_run(args, trace=True)
    per_package: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for module in modules:
        counts = per_package[_package(module)]
        counts[0] += 1
        counts[1] += micros.get(module, 0)
        counts[2] += traced["own"].get(module, 0)
    print(f"\nstart-up of one process: {len(modules)} modules in sys.modules")
    print(f"  {'package':<26} {'modules':>7} {'import ms':>10} {'kept KiB':>9}")
    ranked = sorted(per_package.items(), key=lambda item: -item[1][2])
    for package, (count, time_us, size) in ranked[: args.top]:
        print(f"  {package:<26} {count:>7} {time_us / 1000:>10.1f} {size / 1024:>9.0f}")
    total_us = sum(counts[1] for counts in per_package.values())
    total = sum(counts[2] for counts in per_package.values())
    print(f"  {'(all)':<26} {len(modules):>7} {total_us / 1000:>10.1f} {total / 1024:>9.0f}")
    print(
        f"  Python allocations held at start-up (tracemalloc): "
        f"{traced['traced'] / 2**20:.1f} MiB, {total / 2**20:.1f} MiB of it left by imports"
    )
    print("\nthe modules whose own import (without their imports) kept the most")
    for name, size in sorted(traced["own"].items(), key=lambda i: -i[1])[: args.top]:
        print(f"  {size / 1024:>7.0f} KiB {micros.get(name, 0) / 1000:>7.1f} ms  {name}")
    ours = [m for m in modules if m == "milterapp" or m.startswith("milterapp.")]
    print(f"\nmilterapp modules imported ({len(ours)}): {' '.join(ours)}")
    later = sorted(set(after["modules"]) - set(modules))
    print(
        f"\nmodules imported by the first {args.messages} messages, after start-up: "
        + (" ".join(later) if later else "none")
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--traced-server":
        traced_server()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument(
        "--app",
        choices=["refmilter", "eom-only", "add-header", "add-header-cli", "floor"],
        default="refmilter",
    )
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--c-loadgen", help="the shared C load generator (make -C ../shared/bench)")
    parser.add_argument("--breakdown", action="store_true", help="imports and allocations")
    parser.add_argument("--top", type=int, default=25, help="rows of the breakdown")
    parser.add_argument("--source", help="a checkout to import milterapp from, first")
    args = parser.parse_args()
    where = f", milterapp from {args.source}" if args.source else ""
    print(f"Python {sys.version.split()[0]}, {args.app}, loop {args.loop}{where}")
    for workers in [1] if args.app == "floor" else args.workers:
        measure(args, workers)
    if args.breakdown:
        breakdown(args)


if __name__ == "__main__":
    main()
