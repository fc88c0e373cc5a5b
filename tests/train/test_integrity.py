"""Damage after the fact, concurrency and leftovers: a resumed or rerun result equals the uninterrupted run's bit for
bit, or the run stops with one line naming the damaged file; never a traceback, never a silently different result.

One uninterrupted CPU run (session scope) is the reference: 4 steps of 2 micro-batches, an EMA, checkpoints at steps 2
and 4. Each damage case copies its folder, damages the newest checkpoint (or the cache, or the model files), and
continues through the CLI in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kontext_lora.atomic import remove_leftovers
from kontext_lora.cli import main
from kontext_lora.data.cache import DiskCache, folder_identity, tensor_digest
from kontext_lora.train import checkpoint

from ..conftest import EXAMPLES
from .test_resume import _assert_bit_identical, _Run, _tensors

STEPS = 4
ADAPTER = "pytorch_lora_weights.safetensors"
EMA = "pytorch_lora_weights_ema.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(path: Path, model: Path, out: Path, *, cache: Path | None = None, steps: int = STEPS) -> Path:
    cache_line = f"  cache_dir: '{cache}'\n" if cache else ""
    path.write_text(
        f"model: {{pretrained: '{model}', dtype: float32, max_sequence_length: 8}}\n"
        f"data:\n  datasets: [{{path: '{EXAMPLES}'}}]\n  resolution: 32\n{cache_line}"
        "lora: {rank: 4, alpha: 4, dropout: 0.1}\n"
        f"train: {{steps: {steps}, batch_size: 2, gradient_accumulation: 2, lr: 1.0e-2, scheduler: cosine,"
        " warmup_steps: 1, seed: 3, resume: latest}\n"
        f"output: {{dir: '{out}', save_every: 2}}\nlogging: {{report_to: none}}\nema: {{enabled: true, decay: 0.9}}\n"
    )
    return path


def _train(config: Path, *overrides: str) -> int:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    return main(["train", "--config", str(config), *overrides])


@dataclass
class Reference:
    model: Path
    run: Path  # the uninterrupted run's folder (never changed by a test)
    root: Path


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    import torch as _torch

    threads = _torch.get_num_threads()
    _torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("integrity")
    run = root / "reference"
    assert _train(_config(root / "reference.yaml", tiny_model_dir, run)) == 0
    _torch.set_num_threads(threads)
    return Reference(tiny_model_dir, run, root)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _copy(reference: Reference, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(reference.run, run)
    return run, _config(tmp_path / "job.yaml", reference.model, run)


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()][-1]


# ---------------------------------------------------------------------------------------------- checkpoints


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = bytes(8)
    path.write_bytes(bytes(data))


def _flip_low_bits(path: Path) -> None:
    """The lowest mantissa bit of up to 4000 float32 values (the file parses; every value stays close)."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length
    count = min(4000, (len(data) - start) // 4)
    for i in range(count):
        data[start + 4 * i] ^= 1
    path.write_bytes(bytes(data))


def _scramble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def _wrong_value(path: Path) -> None:
    state = json.loads(path.read_text())
    state["micro_batches"] += 2  # valid JSON, a plausible number: resuming from it would skip data
    path.write_text(json.dumps(state))


DAMAGE = {
    "adapter_cut": (ADAPTER, _cut),
    "adapter_header_zeroed": (ADAPTER, _zero_header),
    "adapter_deleted": (ADAPTER, lambda path: path.unlink()),
    "adapter_low_bits_flipped": (ADAPTER, _flip_low_bits),
    "adapter_scrambled": (ADAPTER, _scramble),
    "ema_scrambled": (EMA, _scramble),
    "state_json_wrong_value": ("training_state.json", _wrong_value),
    "state_tensors_cut": ("training_state.safetensors", _cut),
    "state_tensors_scrambled": ("training_state.safetensors", _scramble),
    "rng_scrambled": ("rng_0.safetensors", _scramble),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_the_uninterrupted_one(
    case: str, reference: Reference, tmp_path: Path, capsys
) -> None:
    run, config = _copy(reference, tmp_path)
    name, damage = DAMAGE[case]
    newest = checkpoint.step_dir(run, STEPS)
    damage(newest / name)
    (run / ADAPTER).unlink()  # as if the run had been killed after its last checkpoint
    capsys.readouterr()
    assert _train(config) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and str(newest / name) in warnings[0], err
    assert "Traceback" not in err
    _assert_bit_identical(run / ADAPTER, reference.run / ADAPTER)
    _assert_bit_identical(run / EMA, reference.run / EMA)
    assert _steps(run) == list(range(1, STEPS + 1))  # the log continues from step 2, each step once
    checkpoint.verify(newest)  # written again, whole, when the run reached that step again


def test_a_damaged_checkpoint_named_explicitly_stops_with_one_line(reference: Reference, tmp_path: Path, capsys):
    run, config = _copy(reference, tmp_path)
    newest = checkpoint.step_dir(run, STEPS)
    _flip_low_bits(newest / "training_state.safetensors")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _train(config, f"train.resume={newest}") == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("kontext-lora: error: ") and str(newest / "training_state.safetensors") in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing written or rewritten


def test_every_checkpoint_damaged_stops_with_one_line(reference: Reference, tmp_path: Path, capsys) -> None:
    run, config = _copy(reference, tmp_path)
    for step in (2, STEPS):
        _scramble(checkpoint.step_dir(run, step) / ADAPTER)
    capsys.readouterr()
    assert _train(config) == 2
    assert "every checkpoint in" in _last_line(capsys.readouterr().err)


def test_resume_of_a_finished_run_changes_nothing(reference: Reference, tmp_path: Path, capsys) -> None:
    run, config = _copy(reference, tmp_path)
    assert _train(config) == 0
    assert "resumed from" in capsys.readouterr().out
    _assert_bit_identical(run / ADAPTER, reference.run / ADAPTER)
    assert _steps(run) == list(range(1, STEPS + 1))  # no step trained again


def test_a_finished_run_is_refused_without_resume_and_overwrite_clears_it(reference, tmp_path, capsys) -> None:
    run, config = _copy(reference, tmp_path)
    (run / "best").mkdir()
    (run / "best.json").write_text('{"metric": "heldout_loss", "value": 0.1, "step": 2}')
    capsys.readouterr()
    assert _train(config, "train.resume=''") == 2
    line = _last_line(capsys.readouterr().err)
    assert f"output.dir {run} holds a finished run" in line and "output.overwrite=true" in line
    assert _train(config, "train.resume=''", "output.overwrite=true") == 0
    assert not (run / "best").exists() and not (run / "best.json").exists()  # nothing of the other run is kept
    _assert_bit_identical(run / ADAPTER, reference.run / ADAPTER)


# ---------------------------------------------------------------------------------------------- cache


def _rerun_on_damaged_cache(reference: Reference, tmp_path: Path, damage, capsys) -> str:
    cache = tmp_path / "cache"
    shutil.copytree(reference.run / "cache", cache)
    shards = sorted(cache.glob("*.safetensors"))
    damage(cache, shards)
    capsys.readouterr()
    assert _train(_config(tmp_path / "job.yaml", reference.model, tmp_path / "run", cache=cache)) == 0
    out, err = capsys.readouterr()
    _assert_bit_identical(tmp_path / "run" / ADAPTER, reference.run / ADAPTER)
    _assert_bit_identical(tmp_path / "run" / EMA, reference.run / EMA)
    return out + err


def _latent_shard(cache: Path, shards: list[Path]) -> tuple[Path, str]:
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                if handle.get_slice(name).get_shape()[0] == 16:  # (16, h, w): a VAE latent
                    return shard, name
    raise AssertionError("no latent in the cache")


def test_scrambled_cache_shard_is_recomputed(reference: Reference, tmp_path: Path, capsys) -> None:
    def damage(cache: Path, shards: list[Path]) -> None:
        shard, _ = _latent_shard(cache, shards)
        _scramble(shard)

    log = _rerun_on_damaged_cache(reference, tmp_path, damage, capsys)
    assert "fail their checksum" in log and "0 entries computed" not in log


def test_nan_latent_in_the_cache_is_recomputed(reference: Reference, tmp_path: Path, capsys) -> None:
    def damage(cache: Path, shards: list[Path]) -> None:
        """One latent set to NaN and its checksum made to match: only the NaN gives it away."""
        shard, name = _latent_shard(cache, shards)
        tensors = _tensors(shard)
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(shard), metadata={key: tensor_digest(value) for key, value in tensors.items()})

    log = _rerun_on_damaged_cache(reference, tmp_path, damage, capsys)
    assert "NaN" in log and "1 entries computed" in log


def test_model_identity_covers_the_whole_weight_file_and_is_hashed_once(reference: Reference, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(reference.model, model)
    index = tmp_path / "file_digests.json"
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    original = folder_identity(model, ["vae"], index)
    recorded = json.loads(index.read_text())
    assert recorded[str(weights.resolve())][:2] == [weights.stat().st_size, weights.stat().st_mtime_ns]

    data = bytearray(weights.read_bytes())
    stat = weights.stat()
    data[len(data) // 2] ^= 0xFF  # the middle of the file: same size, same first and last MiB
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    from kontext_lora.data import cache as cache_module

    cache_module._FOLDER_DIGESTS.clear()
    # Same size and mtime: the digest comes from the index, the file is not read again...
    assert folder_identity(model, ["vae"], index) == original
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    # ...and once the mtime says the file changed, the whole file is hashed: the change in its middle shows.
    assert folder_identity(model, ["vae"], index) != original


def test_cache_verify_drops_a_damaged_copy_even_after_refresh(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    with cache.writer() as writer:
        writer.add("a", torch.ones(4))
        writer.add("b", torch.zeros(4))
    (shard,) = tmp_path.glob("*.safetensors")
    _scramble(shard)
    assert cache.verify(["a", "b"]) >= 1
    cache.refresh()
    assert "a" not in cache or torch.equal(cache.get("a"), torch.ones(4))


# ---------------------------------------------------------------------------------------------- concurrency


def test_two_concurrent_runs_into_one_folder_exactly_one_trains(reference: Reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference.run / "cache", tmp_path / "warm-cache")
    config = _config(tmp_path / "job.yaml", reference.model, run, cache=tmp_path / "warm-cache")
    first = _Run(config, tmp_path / "first.log", delay=0.5)  # slowed checkpoint writes: the first outlives the start
    deadline = time.monotonic() + 60
    while not (run / checkpoint.LOCK_NAME).is_file() or not (run / checkpoint.LOCK_NAME).read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.01)
    second = _Run(config, tmp_path / "second.log")
    assert second.wait(timeout=60) == 2
    line = [x for x in (tmp_path / "second.log").read_text().splitlines() if x.strip()][-1]
    assert line == (
        f"kontext-lora: error: output.dir {run} is in use by another run (pid {first.pid}); wait for it to finish "
        "or choose another output.dir"
    )
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert _steps(run) == list(range(1, STEPS + 1))
    _assert_bit_identical(run / ADAPTER, reference.run / ADAPTER)
    assert not (run / checkpoint.LOCK_NAME).exists()


def test_lock_of_a_killed_run_is_stale(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            with checkpoint.run_lock(tmp_path):
                time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not (tmp_path / checkpoint.LOCK_NAME).is_file() or not (tmp_path / checkpoint.LOCK_NAME).read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(checkpoint.RunFolderError, match=f"pid {pid}"):
        with checkpoint.run_lock(tmp_path):
            pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (tmp_path / checkpoint.LOCK_NAME).is_file()  # left behind by the kill...
    with checkpoint.run_lock(tmp_path):  # ...and free
        assert (tmp_path / checkpoint.LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / checkpoint.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- leftovers, bytes


def test_leftovers_of_interrupted_writes_are_removed_at_the_next_start(reference, tmp_path: Path) -> None:
    run, config = _copy(reference, tmp_path)
    leftovers = [run / f".{ADAPTER}.1a2b3c4d.tmp", run / ".metrics.jsonl.5e6f7a8b.tmp", run / "cache" / "p0-x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    (run / ".tmp-step-000006").mkdir()
    assert _train(config) == 0
    assert not [p for p in leftovers if p.exists()] and not (run / ".tmp-step-000006").exists()
    model_leftover = tmp_path / ".newtiny.0a1b2c3d"
    model_leftover.mkdir()
    (model_leftover / "config.json").write_text("{}")
    assert remove_leftovers(tmp_path / "newtiny") == [model_leftover] and not model_leftover.exists()


def _digests(run: Path) -> dict[str, str]:
    files = [run / ADAPTER, run / EMA, *sorted(p for p in run.glob("step-*/*") if p.is_file())]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_identical_runs_write_identical_bytes_with_the_users_umask(reference: Reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference.run / "cache", tmp_path / "cache")
    config = _config(tmp_path / "job.yaml", reference.model, run, cache=tmp_path / "cache")
    assert _train(config, "output.overwrite=true", "train.resume=''") == 0
    first = _digests(run)
    assert len(first) == 2 + 2 * 7  # adapter, EMA; two checkpoints of adapter, EMA, state (2), rng (2), marker
    assert _train(config, "output.overwrite=true", "train.resume=''") == 0  # the same config: it starts over
    assert _digests(run) == first
    umask = os.umask(0)
    os.umask(umask)
    for name in first:
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
