"""Exact resume: a run SIGKILLed at several points (once while a checkpoint is being written) and resumed with
train.resume=latest ends with the same adapter, bit for bit, as an uninterrupted run (CPU, one thread)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kontext_lora.train import checkpoint
from kontext_lora.train.checkpoint import decode_state, encode_state

from ..conftest import EXAMPLES

STEPS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_config(path: Path, tiny_model_dir: Path, out: Path) -> Path:
    # Everything that could go wrong on resume is exercised: 2 micro-batches a step over 4-batch epochs (the data
    # position crosses epochs mid-step), LoRA dropout (global torch RNG), a warm-up + cosine schedule, an EMA.
    path.write_text(
        f"""
model: {{pretrained: "{tiny_model_dir}", dtype: float32, max_sequence_length: 8}}
data: {{datasets: [{{path: "{EXAMPLES}"}}], resolution: 32}}
lora: {{rank: 4, alpha: 4, dropout: 0.1}}
train: {{steps: {STEPS}, batch_size: 2, gradient_accumulation: 2, lr: 1.0e-2, scheduler: cosine, warmup_steps: 2,
        seed: 3, resume: latest}}
output: {{dir: "{out}", save_every: 2, keep_last: 2}}
logging: {{report_to: none}}
ema: {{enabled: true, decay: 0.9}}
"""
    )
    return path


class _Run:
    """`kontext-lora train --config <config>` in a child process of its own (os.fork of this test process).

    Forked rather than exec'd so each run skips the ~7 s of torch/diffusers imports (this test starts four runs);
    the child runs the CLI's `main` exactly as the command line does, single-threaded so CPU kernels are
    deterministic, and is stopped with a real SIGKILL.
    """

    def __init__(self, config: Path, log: Path, delay: float = 0.0):
        self.log = log
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                handle = open(log, "a", buffering=1)
                os.dup2(handle.fileno(), 1)
                os.dup2(handle.fileno(), 2)
                sys.stdout = sys.stderr = handle
                os.environ[checkpoint.WRITE_DELAY_ENV] = str(delay)
                torch.set_num_threads(1)
                from accelerate.state import AcceleratorState, PartialState

                AcceleratorState._reset_state(reset_partial_state=True)
                PartialState._reset_state()
                from kontext_lora.cli import main

                code = main(["train", "--config", str(config)])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"run did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)


def _kill_when(run: _Run, ready, timeout: float = 60.0) -> None:
    """SIGKILL `run` as soon as `ready()` holds; fail if the run ended (or hung) first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if run.poll() is not None or time.monotonic() > deadline:
            if run.poll() is None:
                run.kill()
            pytest.fail(f"the run ended before the kill point (rc {run.returncode}):\n{run.log.read_text()[-3000:]}")
        time.sleep(0.01)
    run.kill()
    assert run.wait(timeout=30) == -signal.SIGKILL


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _assert_bit_identical(a: Path, b: Path) -> None:
    first, second = _tensors(a), _tensors(b)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key].view(torch.int32), second[key].view(torch.int32)), f"{a.name}: {key}"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkilled_and_resumed_run_matches_an_uninterrupted_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference_run, killed_run = tmp_path / "reference", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.log" for name in ("reference", "killed")}
    reference = _Run(_write_config(tmp_path / "reference.yaml", tiny_model_dir, reference_run), logs["reference"])
    config = _write_config(tmp_path / "killed.yaml", tiny_model_dir, killed_run)

    # Kill 1: mid-training, right after the step-4 checkpoint is complete (each write is slowed to 0.3 s so the
    # run cannot finish before the kill lands).
    _kill_when(_Run(config, logs["killed"], delay=0.3), lambda: checkpoint.is_complete(killed_run / "step-000004"))
    # Kill 2: resumed from step 4, killed while the step-6 checkpoint is being written (its files are on disk, the
    # completion marker and the rename are not).
    tmp6 = checkpoint.temp_dir(killed_run, 6)
    _kill_when(_Run(config, logs["killed"], delay=30), lambda: (tmp6 / "training_state.json").is_file())
    assert not (killed_run / "step-000006").exists()
    previous = checkpoint.latest_checkpoint(killed_run)
    assert previous == killed_run / "step-000004"  # the half-written checkpoint is not picked...
    assert checkpoint.read_state(previous, checkpoint.STATE_NAME)["step"] == 4  # ...and the previous one loads
    assert _tensors(previous / "pytorch_lora_weights.safetensors")

    # Resume to the end.
    finisher = _Run(config, logs["killed"])
    assert finisher.wait(timeout=120) == 0, logs["killed"].read_text()[-3000:]
    assert reference.wait(timeout=120) == 0, logs["reference"].read_text()[-3000:]
    assert logs["killed"].read_text().count("resumed from") == 2

    _assert_bit_identical(killed_run / "pytorch_lora_weights.safetensors",
                          reference_run / "pytorch_lora_weights.safetensors")  # fmt: skip
    _assert_bit_identical(killed_run / "pytorch_lora_weights_ema.safetensors",
                          reference_run / "pytorch_lora_weights_ema.safetensors")  # fmt: skip
    # The log continues without duplicates, and each step's loss is the uninterrupted run's.
    records, expected = _records(killed_run), _records(reference_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]
    # keep_last=2 (the last step is checkpointed too) and no temp folders left behind.
    assert [p.name for p in checkpoint.complete_checkpoints(killed_run)] == ["step-000006", "step-000008"]
    assert not [p for p in killed_run.iterdir() if p.name.startswith(".")]


def test_state_round_trip_keeps_types_without_pickle() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, betas=(0.8, 0.9))
    optimizer.param_groups[0]["params"][0].grad = torch.full((3,), 0.5)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state({})}
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(encode_state(state, tensors)))  # the JSON half really is plain JSON
    restored = decode_state(tree, tensors)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(restored["optimizer"]["state"]) == {0}  # int keys stay ints
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert restored["rng"]["python"] == state["rng"]["python"]
    numpy_state = restored["rng"]["numpy"]
    assert numpy_state[1].dtype == state["rng"]["numpy"][1].dtype and (numpy_state[1] == state["rng"]["numpy"][1]).all()


def test_resume_from_an_incomplete_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "step-000002").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="step-000002 is not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "step-000002"), tmp_path)
    assert checkpoint.resolve_resume("latest", tmp_path) is None  # nothing yet: `latest` starts fresh


def test_clean_stale_restores_a_folder_moved_aside_and_drops_partial_ones(tmp_path: Path) -> None:
    for name in (".trash-best", ".trash-step-000002", "step-000002", ".tmp-step-000004", ".deleting-step-000001"):
        (tmp_path / name).mkdir()
    (tmp_path / ".trash-best" / "pytorch_lora_weights.safetensors").write_bytes(b"old best")
    checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step-000002"]
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes() == b"old best"
