"""Where a GPU step sits idle: read a torch.profiler Chrome trace, find the gaps between kernels, blame the CPU.

A gap is the time between one GPU kernel (or copy) ending and the next starting. When the next kernel was launched
after the GPU had gone idle, the GPU waited on the CPU: the gap is "launch-bound", and the CPU ops running on the
launching thread during it are what to speed up (their self time inside such gaps is summed per op name). Otherwise
the kernel was queued in time and the GPU waited on something else (a stream wait, a sync): "queued".

    python scripts/trace_gaps.py trace.json.gz            # prints the summary (bench_step.py --trace writes traces)

torch.profiler has no such view (its key_averages give CPU and GPU totals, not what overlaps the idle time), hence
this script.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "python_function", "user_annotation", "cuda_runtime", "cuda_driver")


def load_trace(path: Path) -> list[dict]:
    """The complete ('X') events of a Chrome trace, .json or .json.gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        events = json.load(handle)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _self_overlaps(events: list[dict], windows: list[tuple[float, float]]) -> dict[str, float]:
    """Per op name: the op's self time (its time minus its children's, events nested as on one thread) that falls
    inside `windows` (sorted, disjoint (start, end) intervals), in microseconds."""
    starts = [w[0] for w in windows]

    def overlap(start: float, end: float) -> float:
        total, i = 0.0, max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(windows) and windows[i][0] < end:
            total += max(0.0, min(end, windows[i][1]) - max(start, windows[i][0]))
            i += 1
        return total

    totals: dict[str, float] = defaultdict(float)
    stack: list[tuple[dict, float]] = []  # (event, its overlap) of the enclosing ops
    for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= event["ts"]:
            stack.pop()
        mine = overlap(event["ts"], event["ts"] + event["dur"])
        totals[event["name"]] += mine
        if stack:
            totals[stack[-1][0]["name"]] -= mine  # the parent's self time excludes this child
        stack.append((event, mine))
    return totals


def analyze(events: list[dict], min_gap_us: float = 5.0, top: int = 15) -> dict:
    """Idle time of the GPU over the traced span, split into launch-bound and queued, and the CPU ops that ran in the
    launch-bound gaps. Times in ms."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return {"error": "no GPU events in the trace"}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}  # fmt: skip
    busy_until, launch_bound, queued = gpu[0]["ts"] + gpu[0]["dur"], [], 0.0
    windows_by_thread: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    busy = gpu[0]["dur"]
    for event in gpu[1:]:
        start, end = event["ts"], event["ts"] + event["dur"]
        if start - busy_until > min_gap_us:
            launch = launches.get(event.get("args", {}).get("correlation"))
            if launch is not None and launch["ts"] > busy_until:  # launched only after the GPU had gone idle
                window = (busy_until, min(start, launch["ts"] + launch["dur"]))
                launch_bound.append(start - busy_until)
                windows_by_thread[(launch["pid"], launch["tid"])].append(window)
            else:
                queued += start - busy_until
        busy += max(0.0, end - max(start, busy_until))
        busy_until = max(busy_until, end)
    span = busy_until - gpu[0]["ts"]
    blame: dict[str, float] = defaultdict(float)
    for thread, windows in windows_by_thread.items():
        on_thread = [e for e in events if e.get("cat") in CPU_CATEGORIES and (e["pid"], e["tid"]) == thread]
        for name, micros in _self_overlaps(on_thread, sorted(windows)).items():
            blame[name] += micros
    threads = {str(t): round(sum(b - a for a, b in w) / 1e3, 3) for t, w in windows_by_thread.items()}
    return {
        "span_ms": round(span / 1e3, 3), "gpu_busy_ms": round(busy / 1e3, 3),
        "launch_bound_idle_ms": round(sum(launch_bound) / 1e3, 3), "launch_bound_gaps": len(launch_bound),
        "queued_idle_ms": round(queued / 1e3, 3), "launch_bound_ms_by_thread": threads,
        "cpu_ops_in_launch_bound_gaps_ms": {name: round(us / 1e3, 3) for name, us in
                                            sorted(blame.items(), key=lambda kv: -kv[1])[:top] if us > 0},
    }  # fmt: skip


def format_summary(summary: dict) -> str:
    """A few readable lines of `analyze`'s result."""
    if "error" in summary:
        return summary["error"]
    lines = [
        f"GPU busy {summary['gpu_busy_ms']} of {summary['span_ms']} ms traced; idle waiting on launches "
        f"{summary['launch_bound_idle_ms']} ms ({summary['launch_bound_gaps']} gaps), other idle "
        f"{summary['queued_idle_ms']} ms; launch-bound ms by thread {summary['launch_bound_ms_by_thread']}",
        "CPU ops (self ms) running in the launch-bound gaps:",
    ]
    lines += [f"  {ms:8.2f}  {name[:110]}" for name, ms in summary["cpu_ops_in_launch_bound_gaps_ms"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=5.0, help="shorter gaps are not counted")
    args = parser.parse_args()
    print(format_summary(analyze(load_trace(args.trace), args.min_gap_us)))


if __name__ == "__main__":
    main()
