"""Downtime of a rehearsed switch: from the start of the injection to the new init's first line.

A rehearsal with 50 stand-in services that all exit on SIGTERM, so the grace period is never
waited out. Both ends are read on the same clock: CLOCK_BOOTTIME here, /proc/uptime (the
same clock, 10 ms resolution) printed by the new init as its very first act.

    sudo .venv/bin/python tests/bench/bench_downtime.py [--runs 5] [--services 50]

Not part of the pass/fail suite: absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from injector.events import Console, Finished, Injection, StepStarted
from injector.switch import SwitchOptions, run


def one_run(services: int) -> tuple[float, float]:
    """(injection start → init's first line, ptrace injection alone), in milliseconds."""
    options = SwitchOptions(
        image="tinybox",
        init_argv=["/bin/sh", "-c", "read up idle < /proc/uptime; echo uptime=$up"],
        rehearse=True,
        service_kinds=["plain"] * services,
    )
    started = first_line = injection_ms = None
    for event in run(options):
        if isinstance(event, StepStarted) and event.step == "inject":
            started = time.clock_gettime(time.CLOCK_BOOTTIME)
        elif isinstance(event, Injection):
            injection_ms = event.elapsed_ms
        elif isinstance(event, Console) and event.text.startswith("uptime="):
            first_line = float(event.text.removeprefix("uptime="))
        elif isinstance(event, Finished) and event.exit_status != 0:
            raise SystemExit(f"rehearsal failed with status {event.exit_status}")
    if started is None or first_line is None or injection_ms is None:
        raise SystemExit("the rehearsal did not report the injection and the init's first line")
    return (first_line - started) * 1000, injection_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--services", type=int, default=50)
    args = parser.parse_args()
    os.environ["DBOOT_REHEARSAL_ONLY"] = "1"
    downtimes, injections = [], []
    for number in range(1, args.runs + 1):
        downtime, injection = one_run(args.services)
        downtimes.append(downtime)
        injections.append(injection)
        print(f"run {number}: downtime {downtime:6.0f} ms (injection {injection:5.1f} ms)")
    print(
        f"median downtime {statistics.median(downtimes):.0f} ms over {args.runs} runs with "
        f"{args.services} services (target < 500 ms; /proc/uptime resolution 10 ms); "
        f"median injection {statistics.median(injections):.1f} ms"
    )


if __name__ == "__main__":
    main()
