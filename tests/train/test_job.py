"""A job's phases: job.json records each phase, and out of memory in any phase is one line and a resumable run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kontext_lora.cli import main
from kontext_lora.train import loop, validation
from kontext_lora.train.job import JOB_NAME

from ..conftest import EXAMPLES

OOM = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 23.6 GiB"


def _args(tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", str(EXAMPLES.parents[1] / "configs" / "examples" / "tiny_bw.yaml"),
        f"model.pretrained={tiny_model_dir}", "model.max_sequence_length=16", "data.resolution=64",
        "lora.rank=4", "train.steps=4", f"output.dir={out}", "output.save_every=0", "validation.every=2",
        "validation.steps=2", "validation.examples=[]", "validation.at_start=false", "logging.report_to=none", *extra,
    ]  # fmt: skip


def _error_line(capsys) -> str:
    """The one error line the CLI printed (progress bars share stderr); no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("kontext-lora: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _fail_once(monkeypatch, owner, name: str, when=lambda: True) -> None:
    """Make `owner.name` raise torch's out-of-memory error the first time `when()` holds."""
    real, state = getattr(owner, name), {"raised": False}

    def failing(*args, **kwargs):
        if not state["raised"] and when():
            state["raised"] = True
            raise torch.OutOfMemoryError(OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_job_json_records_every_phase(tiny_model_dir: Path, tmp_path: Path, one_thread) -> None:
    assert main(_args(tiny_model_dir, tmp_path / "run")) == 0
    job = json.loads((tmp_path / "run" / JOB_NAME).read_text())
    phases = job["phases"]
    assert {"cache", "load", "setup", "first_step", "train", "validation", "save"} <= set(phases)
    assert phases["first_step"]["entries"] == 1 and phases["train"]["entries"] == 3  # 4 steps, batch 2, no accumulation
    assert phases["validation"]["entries"] == 2  # step 2 and the end
    assert all(entry["wall_s"] > 0 and entry["spans"] for entry in phases.values())


@pytest.mark.parametrize("phase", ["cache", "load", "setup", "first_step"])
def test_out_of_memory_before_training_is_one_line(
    phase: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys, one_thread
) -> None:
    target = {
        "cache": (loop, "cached_dataset"),
        "load": (loop, "load_transformer"),
        "setup": (loop, "apply_memory_and_speed"),
        "first_step": (loop, "training_step"),
    }[phase]
    _fail_once(monkeypatch, *target)
    assert main(_args(tiny_model_dir, tmp_path / "run")) == 2
    err = _error_line(capsys)
    assert f"out of accelerator memory in {phase}, needed 2.50 GiB more" in err
    assert phase != "first_step" or "nothing was trained yet" in err
    recorded = json.loads((tmp_path / "run" / JOB_NAME).read_text())["phases"][phase]
    assert recorded["out_of_memory"].startswith(f"out of accelerator memory in {phase}")


@pytest.mark.parametrize("phase", ["train", "validation"])
def test_out_of_memory_in_training_saves_a_checkpoint_that_resumes_exactly(
    phase: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys, one_thread
) -> None:
    assert main(_args(tiny_model_dir, tmp_path / "whole")) == 0
    whole = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    capsys.readouterr()

    calls = {"n": 0}
    if phase == "train":  # the third step fails: steps 1 and 2 are done

        def third() -> bool:
            calls["n"] += 1
            return calls["n"] == 3

        _fail_once(monkeypatch, loop, "training_step", third)
    else:  # the validation at step 2 fails
        _fail_once(monkeypatch, validation.Validator, "sample")
    assert main(_args(tiny_model_dir, tmp_path / "run")) == 2
    err = _error_line(capsys)
    assert f"out of accelerator memory in {phase}" in err
    assert "step 2 was saved to" in err and "train.resume=latest" in err
    assert (tmp_path / "run" / "step-000002" / "pytorch_lora_weights.safetensors").is_file()

    monkeypatch.undo()
    assert main(_args(tiny_model_dir, tmp_path / "run", "train.resume=latest")) == 0
    resumed = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
