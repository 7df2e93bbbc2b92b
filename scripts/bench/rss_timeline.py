"""Where a process's memory goes over time: runs a command, samples its resident set size
(VmRSS of /proc/PID/status) every 20 ms, and prints a timeline of the RSS changes larger than
--step GB merged with the command's stderr lines (its logs), each stamped with the seconds since
the start, then the peak. Used to find what raises `worker train`'s peak RSS (see README,
Benchmarks).

usage: python scripts/bench/rss_timeline.py [--step 0.1] -- COMMAND [ARGS...]"""
import argparse
import subprocess
import sys
import threading
import time


def memory_gb(pid):
    """(resident set size, its high-water mark) of the process in GB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return tuple(int(fields[k].split()[0]) * 1024 / 1e9 for k in ("VmRSS", "VmHWM"))
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", type=float, default=0.1, help="smallest RSS change printed, GB")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    start = time.monotonic()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    events = []

    def read_logs():
        for line in proc.stderr:
            events.append((time.monotonic() - start, "log " + line.rstrip()))

    reader = threading.Thread(target=read_logs)
    reader.start()
    peak, printed = 0.0, 0.0
    while proc.poll() is None:
        memory = memory_gb(proc.pid)
        if memory is not None:
            rss, high_water = memory
            peak = max(peak, high_water)
            if abs(rss - printed) >= args.step:
                events.append((time.monotonic() - start, f"rss {rss:.2f} GB"))
                printed = rss
        time.sleep(0.02)
    reader.join()
    for seconds, text in sorted(events, key=lambda e: e[0]):
        print(f"{seconds:8.2f} s  {text}")
    print(f"peak RSS {peak:.2f} GB (VmHWM); exit status {proc.returncode}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
