"""What a chain costs: the reference milter alone, and behind a milterapp chain, in one run.

The upstream is the reference milter (bench/refmilter.py, every event handled, a header added
at end of message). The chain is an App with no handlers of its own and that milter as its
one upstream (``app.use_milter``): everything the MTA sends goes through the chain's
negotiation, forwarding and end-of-message replay. Rounds alternate between the two set-ups
with the same load generator, so that the machine's drift hits both alike.

With two or more cores the upstream is pinned to core 1 and the generator to core 0 in both
set-ups, and the chain's own process to core 0 too (beside the generator, which costs little
when it is the C one): the upstream gets the same core either way.

Run: ``python bench/chain_bench.py [--duration 5] [--rounds 3] [--connections 32]
[--body-size 4096] [--messages-per-connection 10] [--c-loadgen PATH] [--no-pin]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import free_port, load, wait_listening  # noqa: E402 - after the path is set

FRONT = """
import sys
from milterapp import App

app = App("chain")
app.use_milter(sys.argv[2], name="upstream")
app.run(sys.argv[1], argv=[], log_level="WARNING")
"""


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """User and system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(command: list[str], port: int, pin: list[str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(pin + command, stderr=subprocess.DEVNULL)  # noqa: S603
    wait_listening(port, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--body-size", type=int, default=4096)
    parser.add_argument("--messages-per-connection", type=int, default=10)
    parser.add_argument("--c-loadgen", help="the shared C load generator (else milterapp bench)")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    args.quickack, args.processes = False, 1
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    core0, core1 = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if pinned else ([], [])

    upstream_port, front_port = free_port(), free_port()
    upstream_spec = f"inet:{upstream_port}@127.0.0.1"
    upstream = start(
        [sys.executable, str(HERE / "refmilter.py"), upstream_spec], upstream_port, core1
    )
    front = start(
        [sys.executable, "-c", FRONT, f"inet:{front_port}@127.0.0.1", upstream_spec],
        front_port,
        core0,
    )
    rates: dict[str, list[float]] = {"upstream alone": [], "through the chain": []}
    p99: dict[str, list[float]] = {name: [] for name in rates}
    # CPU milliseconds per message of each process in each set-up: steadier than the rates
    # on a shared machine (the warm-up's messages count too, so these are upper bounds).
    cpu: dict[str, list[float]] = {"upstream alone": [], "chain": [], "its upstream": []}
    try:
        for _ in range(args.rounds):
            setups = (("upstream alone", upstream_port), ("through the chain", front_port))
            for name, port in setups:
                before = cpu_seconds(upstream), cpu_seconds(front)
                result = load(port, args, [])  # the generator goes where there is room
                spent = cpu_seconds(upstream) - before[0], cpu_seconds(front) - before[1]
                if result["errors"]:
                    print(f"{name}: {result['errors']:.0f} errors", file=sys.stderr)
                rates[name].append(result["rate"])
                p99[name].append(result["p99"])
                messages = result["rate"] * (args.duration + args.warmup) or 1
                if port == upstream_port:
                    cpu["upstream alone"].append(1000 * spent[0] / messages)
                else:
                    cpu["chain"].append(1000 * spent[1] / messages)
                    cpu["its upstream"].append(1000 * spent[0] / messages)
    finally:
        stop(front)
        stop(upstream)

    generator = "C loadgen" if args.c_loadgen else "milterapp bench"
    print(
        f"{args.rounds} rounds of {args.duration:g} s, {args.connections} connections, "
        f"{args.messages_per_connection} messages per connection, "
        f"{args.body_size} B body, {generator}, pinned={pinned}"
    )
    print(f"{'set-up':<20} {'msgs/s (median)':>16} {'p99 ms':>8}  rounds")
    for name in rates:
        rounds = " ".join(f"{rate:.0f}" for rate in rates[name])
        median = statistics.median(rates[name])
        print(f"{name:<20} {median:>16.0f} {statistics.median(p99[name]):>8.1f}  {rounds}")
    ratios = [
        chain / alone
        for chain, alone in zip(rates["through the chain"], rates["upstream alone"], strict=True)
        if alone
    ]
    if ratios:
        print(f"chain / alone: {statistics.median(ratios):.2f} (median of the rounds' ratios)")
    costs = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        "CPU ms per message: upstream alone {upstream alone:.3f}; through the chain: the chain "
        "{chain:.3f}, its upstream {its upstream:.3f}".format(**costs)
    )
    print(
        f"upstream alone / chain, CPU per message: {costs['upstream alone'] / costs['chain']:.2f}"
    )


if __name__ == "__main__":
    main()
