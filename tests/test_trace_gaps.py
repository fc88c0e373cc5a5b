"""scripts/trace_gaps.py on a Chrome trace written to disk (the format torch.profiler exports): gaps between GPU
kernels are split into launch-bound (launched after the GPU went idle) and queued, and the CPU ops running on the
launching thread during launch-bound gaps are charged their self time."""

from __future__ import annotations

import gzip
import json

import pytest

from scripts.trace_gaps import analyze, format_summary, load_trace


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, correlation: int | None = None) -> dict:
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}


@pytest.fixture
def trace_path(tmp_path):
    """Kernel A 0-100 us; B launched at 150 (GPU idle since 100) runs 160-200; C launched at 20 but starts at 300
    (queued behind a wait); D launched on thread 2 at 420, runs 430-500.
    Main thread: `step` 0-200 holding `optimizer` 110-140 (so step's self time in gap 100-160 is 30 - 10 = 20 us
    after the launch's 10 us); thread 2: `backward` 350-450."""
    events = [
        _event("kernel", "A", 0, 100, tid=7, correlation=1),
        _event("kernel", "B", 160, 40, tid=7, correlation=2),
        _event("kernel", "C", 300, 50, tid=7, correlation=3),
        _event("kernel", "D", 430, 70, tid=7, correlation=4),
        _event("cuda_runtime", "cudaLaunchKernel", 5, 5, correlation=1),
        _event("cuda_runtime", "cudaLaunchKernel", 150, 10, correlation=2),
        _event("cuda_runtime", "cudaLaunchKernel", 20, 5, correlation=3),
        _event("cuda_runtime", "cudaLaunchKernel", 420, 5, tid=2, correlation=4),
        _event("cpu_op", "step", 0, 200),
        _event("cpu_op", "optimizer", 110, 30),
        _event("cpu_op", "backward", 350, 100, tid=2),
        {"ph": "i", "name": "an instant event, ignored", "ts": 1},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    return path


def test_gaps_are_split_and_blamed_on_the_cpu_ops_running_in_them(trace_path) -> None:
    summary = analyze(load_trace(trace_path))
    assert summary["span_ms"] == 0.5
    assert summary["gpu_busy_ms"] == 0.26  # 100 + 40 + 50 + 70 us
    assert summary["launch_bound_gaps"] == 2  # 100-160 (main thread) and 350-430 (thread 2)
    assert summary["launch_bound_idle_ms"] == 0.14
    assert summary["queued_idle_ms"] == 0.1  # 200-300: C was launched at 20
    assert summary["launch_bound_ms_by_thread"] == {"(0, 1)": 0.06, "(0, 2)": 0.075}  # windows end at launch end
    blame = summary["cpu_ops_in_launch_bound_gaps_ms"]
    assert blame == {"backward": 0.07, "optimizer": 0.03, "step": 0.02, "cudaLaunchKernel": 0.015}
    assert "launch-bound ms by thread" in format_summary(summary)


def test_a_trace_without_gpu_events_says_so(tmp_path) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps([_event("cpu_op", "step", 0, 10)]))
    assert analyze(load_trace(path)) == {"error": "no GPU events in the trace"}
