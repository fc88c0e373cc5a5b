"""A SIGTERM (what `kontext-lora ui` sends to stop a run) or Ctrl-C saves a checkpoint at the next step boundary
and exits with one line; train.resume=latest then ends bit-identical to an uninterrupted run (CPU, one thread)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from kontext_lora.train import checkpoint

from ..conftest import EXAMPLES
from .test_resume import _assert_bit_identical, _records, _Run

STEPS = 20

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(path: Path, tiny_model_dir: Path, out: Path) -> Path:
    path.write_text(
        f"""
model: {{pretrained: "{tiny_model_dir}", dtype: float32, max_sequence_length: 8}}
data: {{datasets: [{{path: "{EXAMPLES}"}}], resolution: 32}}
lora: {{rank: 4, alpha: 4}}
train: {{steps: {STEPS}, batch_size: 2, lr: 1.0e-2, scheduler: cosine, seed: 3, resume: latest}}
output: {{dir: "{out}", save_every: 0}}
logging: {{report_to: none}}
"""
    )
    return path


def _signal_when_stepping(run: _Run, out: Path, signum: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(_records(out)) >= 3):
        if run.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run ended before it was signalled (rc {run.returncode}):\n{run.log.read_text()[-3000:]}")
        time.sleep(0.01)
    run.send(signum)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference")
    run = _Run(_config(folder / "config.yaml", tiny_model_dir, folder / "run"), folder / "train.log")
    assert run.wait(timeout=120) == 0, (folder / "train.log").read_text()[-3000:]
    return folder / "run"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_keeps_a_checkpoint_and_resumes_exactly(
    tiny_model_dir: Path, reference_run: Path, tmp_path: Path, signum: int
) -> None:
    stopped_run = tmp_path / "stopped"
    config = _config(tmp_path / "stopped.yaml", tiny_model_dir, stopped_run)
    log = tmp_path / "stopped.log"
    stopped = _Run(config, log)
    _signal_when_stepping(stopped, stopped_run, signum)
    assert stopped.wait(timeout=60) == 2, log.read_text()[-3000:]

    kept = checkpoint.latest_checkpoint(stopped_run)
    assert kept is not None, log.read_text()[-3000:]
    step = checkpoint.read_state(kept, checkpoint.STATE_NAME)["step"]
    assert 3 <= step < STEPS
    assert _records(stopped_run)[-1]["step"] == step  # the checkpoint is the last step the run logged
    name = signal.Signals(signum).name
    assert f"kontext-lora: error: stopped by {name} at step {step}; checkpoint {kept} kept" in log.read_text()
    assert not (stopped_run / "pytorch_lora_weights.safetensors").exists()  # stopped, not finished

    assert _Run(config, log).wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"resumed from {kept} at step {step}" in log.read_text()
    _assert_bit_identical(stopped_run / "pytorch_lora_weights.safetensors",
                          reference_run / "pytorch_lora_weights.safetensors")  # fmt: skip
    assert [r["step"] for r in _records(stopped_run)] == list(range(1, STEPS + 1))
