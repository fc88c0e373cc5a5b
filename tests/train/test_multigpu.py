"""Several processes (CPU, gloo) train the adapter one process trains at the same global batch.

2 processes x batch 3 x accumulation 1 against 1 process x batch 3 x accumulation 2, each a real `train.py` run
(preflight, cache, fit, saving) on the example photos: global micro-batch k goes to process k % 2 (ShardedBatches),
its noise and sigmas are seeded by k alone, and DDP's gradient mean is accumulation's mean. Batches of 3 over 8
triples give 3-batch epochs (3, 3, 2 samples), so steps span epochs and ranks see different batch sizes.
A 2-process run resumed from its step-4 checkpoint ends with the same adapter, bit for bit. Validation runs at
steps 3 and 6 in each: shared out across the 2 processes, it records what the one process records.
The 2-process run is `torchrun --nproc_per_node 2 train.py` with ACCELERATE_USE_CPU=1, which accelerate turns into
MULTI_CPU over gloo (`accelerate launch` starts several CPU processes only through mpirun).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..conftest import EXAMPLES, REPO

STEPS = 6
# float32 on CPU: the runs differ only in summation order (DDP's all-reduce of two gradients against accumulating
# them), which Adam's normalisation can amplify over 6 steps (measured: 2e-6); 1e-4 is far below any real difference
# (another seed or micro-batch order moves the weights by ~1e-1, the training itself by ~1e-2 and more).
ATOL = 1e-4


def _config(path: Path, tiny_model_dir: Path, out: Path, accumulation: int, save_every: int = 0) -> Path:
    path.write_text(
        f"""
model: {{pretrained: "{tiny_model_dir}", dtype: float32, max_sequence_length: 8}}
data: {{datasets: [{{path: "{EXAMPLES}"}}], resolution: 32}}
lora: {{rank: 4, alpha: 4}}
train: {{steps: {STEPS}, batch_size: 3, gradient_accumulation: {accumulation}, lr: 1.0e-2, scheduler: cosine,
        warmup_steps: 2, seed: 3, resume: latest}}
output: {{dir: "{out}", save_every: {save_every}}}
logging: {{report_to: none}}
validation: {{every: 3, heldout_path: "{EXAMPLES}", max_images: 3, steps: 2}}
"""
    )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(config: Path, log: Path, processes: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "train.py", "--config", str(config)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                        "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"run did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    assert process.returncode == 0, log.read_text()[-3000:]


def _max_difference(a: Path, b: Path) -> float:
    first, second = load_file(str(a)), load_file(str(b))
    assert set(first) == set(second) and first
    return max((first[key] - second[key]).abs().max().item() for key in first)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[float]:
    return [record["loss"] for record in _records(run) if "loss" in record]


def _validations(run: Path) -> list[dict]:
    return [record for record in _records(run) if "heldout_loss" in record]


def test_two_processes_train_the_adapter_one_process_trains_with_accumulation(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    runs = [
        (_launch(_config(tmp_path / "one.yaml", tiny_model_dir, one, 2), tmp_path / "one.log", 1), "one.log"),
        (_launch(_config(tmp_path / "two.yaml", tiny_model_dir, two, 1, save_every=2), tmp_path / "two.log", 2),
         "two.log"),
    ]  # fmt: skip
    for process, log in runs:
        _finish(process, tmp_path / log)
    # Resume with 2 processes from the step-4 checkpoint (a copy of the run without its final adapter): the data
    # position (micro-batches per process), noise and RNG states continue exactly.
    shutil.copytree(two, resumed)
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    config = _config(tmp_path / "resumed.yaml", tiny_model_dir, resumed, 1, save_every=2)
    _finish(_launch(config, tmp_path / "resumed.log", 2), tmp_path / "resumed.log")
    assert "resumed from" in (tmp_path / "resumed.log").read_text()

    adapter = "pytorch_lora_weights.safetensors"
    difference = _max_difference(one / adapter, two / adapter)
    print(f"max |adapter(1 process, accumulation 2) - adapter(2 processes)| = {difference:.2e}")
    assert difference < ATOL
    trained = load_file(str(two / adapter))  # lora_B starts at 0: training moved it far beyond the tolerance
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 100 * ATOL
    # The logged loss is the mean over both processes' micro-batches, as one process with accumulation logs it.
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert _max_difference(resumed / adapter, two / adapter) == 0.0
    assert _losses(resumed) == _losses(two)
    # Validation (steps 3 and 6): the 2 processes share the loss chunks and the 3 sampled items and gather them;
    # the record is the one process's, the grids are all written, once.
    one_val, two_val = _validations(one), _validations(two)
    assert [r["step"] for r in two_val] == [r["step"] for r in one_val] == [3, 6]
    for a, b in zip(one_val, two_val, strict=True):
        assert set(a) == set(b) and {"heldout_loss", "edit_l1", "edit_psnr"} <= set(a)
        assert all(b[key] == pytest.approx(a[key], rel=1e-4) for key in a if a[key] is not None)
    assert len(list((two / "validation" / "step-000003").glob("*.png"))) == 3
    assert (two / "best" / adapter).exists()
    # Only the main process writes run files: one metrics line per step, one adapter, no per-rank leftovers.
    assert len(_losses(two)) == STEPS
    assert sorted(p.name for p in two.iterdir() if p.suffix == ".safetensors") == [adapter]
