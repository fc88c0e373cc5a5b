"""Sweep files: grid / random / listed runs, run names, and the checks that name the file and key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kontext_lora.config import ConfigError, load_config
from kontext_lora.sweep.spec import dotlist_value, load_sweep, run_name, sample_random

from ..conftest import REPO


def _sweep_file(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_is_the_cartesian_product_with_readable_unique_names(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, "grid:\n  lora.rank: [4, 8]\n  train.lr: [1e-3, 3.0e-4]\nfixed: {train.steps: 7}\n")
    sweep = load_sweep(path)
    assert sweep.name == "s" and sweep.dir == Path("runs/sweeps/s") and sweep.method == "grid"
    assert [run.name for run in sweep.runs] == ["rank4_lr1e-3", "rank4_lr3e-4", "rank8_lr1e-3", "rank8_lr3e-4"]
    assert [run.overrides for run in sweep.runs][1] == {"lora.rank": 4, "train.lr": 3e-4}
    assert sweep.keys == ["lora.rank", "train.lr"] and sweep.fixed == {"train.steps": 7}
    assert load_sweep(path, tmp_path / "elsewhere").dir == tmp_path / "elsewhere"
    # Sections may be nested instead of dotted.
    nested = _sweep_file(
        tmp_path, "grid:\n  lora: {rank: [4, 8]}\n  train:\n    lr: [1e-3, 3.0e-4]\nfixed: {train: {steps: 7}}\n"
    )
    assert [run.overrides for run in load_sweep(nested).runs] == [run.overrides for run in sweep.runs]
    assert load_sweep(nested).fixed == {"train.steps": 7}


def test_one_key_writes_its_numbers_one_way_in_every_run_name(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, "grid:\n  train.lr: [1.0e-3, 0.01, 0.5]\n  lora.alpha: [2.0, 0.5]\n")
    names = [run.name for run in load_sweep(path).runs]
    assert names[:3] == ["lr1e-3_alpha2", "lr1e-3_alpha0.5", "lr1e-2_alpha2"]
    assert names[-1] == "lr5e-1_alpha0.5"  # lr needs an exponent somewhere, so it has one everywhere; alpha nowhere


def test_run_names_are_filesystem_safe_and_disambiguated() -> None:
    keys = ["lora.preset", "lora.target_modules", "train.gradient_checkpointing", "logging.wandb_project"]
    name = run_name(
        {"lora.preset": "attention", "lora.target_modules": ["to_q", "to_k"], "train.gradient_checkpointing": True,
         "logging.wandb_project": "a photo / of: it"}, keys,
    )  # fmt: skip
    assert name == "preset-attention_target_modules-to_q-to_k_gradient_checkpointing-true_wandb_project-a-photo-of-it"
    assert (
        run_name({"train.lr": 2.5e-5, "model.guidance": 3.5}, ["train.lr", "model.guidance"]) == "lr2.5e-5_guidance3.5"
    )
    # Two swept keys with the same last part keep their full dotted names.
    assert run_name({"lora.alpha": 8.0, "x.alpha": 2}, ["lora.alpha", "x.alpha"]) == "lora.alpha8_x.alpha2"
    long = run_name({"logging.wandb_project": "x" * 300}, ["logging.wandb_project"])
    assert len(long) <= 100 and long != run_name({"logging.wandb_project": "x" * 299}, ["logging.wandb_project"])


def test_listed_runs_keep_their_names_and_repeated_names_get_a_suffix(tmp_path: Path) -> None:
    path = _sweep_file(
        tmp_path, "name: mine\ndir: out/here\nruns:\n  - {lora.rank: 4}\n  - {name: big one, lora.rank: 32}\n"
        "  - {lora.rank: 4, train.lr: 0.01}\n  - {lora.rank: 4}\n  - {}\n",
    )  # fmt: skip
    sweep = load_sweep(path)
    assert sweep.name == "mine" and sweep.dir == Path("out/here") and sweep.keys == ["lora.rank", "train.lr"]
    assert [run.name for run in sweep.runs] == ["rank4", "big-one", "rank4_lr0.01", "rank4-2", "base"]


def test_random_search_is_seeded_log_uniform_for_lr_and_stays_in_range(tmp_path: Path) -> None:
    parameters = {
        "train.lr": {"min": 1e-5, "max": 1e-3},
        "lora.rank": [4, 8, 16],
        "train.steps": {"min": 100, "max": 400},
        "lora.dropout": {"min": 0.0, "max": 0.5},
    }
    draws = sample_random(parameters, 400, seed=3)
    assert draws == sample_random(parameters, 400, seed=3) and draws != sample_random(parameters, 400, seed=4)
    lrs = [d["train.lr"] for d in draws]
    assert all(1e-5 <= lr <= 1e-3 and float(f"{lr:.3g}") == lr for lr in lrs)  # rounded to 3 digits
    # Log-uniform: half the draws fall below the geometric middle 1e-4 (uniform would put 9% there).
    assert 0.4 < sum(lr < 1e-4 for lr in lrs) / len(lrs) < 0.6
    # Plain uniform for other ranges: about half below the arithmetic middle.
    assert 0.4 < sum(d["lora.dropout"] < 0.25 for d in draws) / len(draws) < 0.6
    steps = [d["train.steps"] for d in draws]
    assert all(isinstance(s, int) and 100 <= s <= 400 for s in steps) and len(set(steps)) > 50
    assert {d["lora.rank"] for d in draws} == {4, 8, 16}

    path = _sweep_file(
        tmp_path, "random:\n  samples: 5\n  seed: 1\n  parameters:\n    train.lr: {min: 1.0e-5, max: 1.0e-3}\n"
        "    lora.rank: [4, 8]\n",
    )  # fmt: skip
    sweep = load_sweep(path)
    assert sweep.method == "random" and sweep.samples == 5 and len(sweep.runs) == 5
    assert [run.overrides for run in sweep.runs] == sample_random(sweep.parameters, 5, 1)
    # Only lists: repeated draws are kept once.
    path = _sweep_file(tmp_path, "random: {samples: 50, parameters: {lora.rank: [4, 8]}}\n")
    assert sorted(run.name for run in load_sweep(path).runs) == ["rank4", "rank8"]


def test_overrides_read_back_through_load_config_unchanged(tmp_path: Path) -> None:
    values = {
        "train.lr": 1e-5, "lora.rank": 4, "lora.preset": "attention", "logging.wandb_project": "1e-3",
        "lora.target_modules": ["to_q", "to_k"], "train.gradient_checkpointing": True,
        "lora.init_from": "it's.safetensors",
    }  # fmt: skip
    for key, value in values.items():
        text = dotlist_value(value)
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]))
        assert OmegaConf.select(OmegaConf.create(parsed), key) == value, (key, text)
    path = _sweep_file(tmp_path, "runs:\n  - {train.lr: 1e-5, logging.wandb_project: '1e-3', lora.rank: 4}\n")
    run = load_sweep(path).runs[0]
    cfg = load_config(REPO / "configs/examples/tiny_bw.yaml", run.dotlist())
    assert (cfg.train.lr, cfg.logging.wandb_project, cfg.lora.rank) == (1e-5, "1e-3", 4)
    assert math.isclose(cfg.train.lr, 1e-5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid:\n  lora.rnk: [4]\n", "s.yaml: grid: unknown config key `lora.rnk`; did you mean `lora.rank`?"),
        ("grid:\n  lora: {rnk: [4]}\n", "s.yaml: grid: unknown config key `lora.rnk`; did you mean `lora.rank`?"),
        ("grid:\n  lora.rank: 4\n", "s.yaml: grid: `lora.rank` needs a non-empty list of values, got 4"),
        (
            "grid: {lora.rank: [4]}\nruns: [{lora.rank: 4}]\n",
            "exactly one of grid, random, runs (found grid, runs)",
        ),
        ("gird: {lora.rank: [4]}\n", "unknown entry `gird` (allowed here: name, dir, fixed, grid, random, runs)"),
        ("grid: {output.dir: [a, b]}\n", "`output.dir` is set by the sweep"),
        ("random: {samples: 2, parameters: {train.lr: {min: 0, max: 1}}}\n", "log-uniformly, so min must be > 0"),
        ("random: {samples: 2, parameters: {train.lr: {min: 1, max: 0.1}}}\n", "range needs numbers min < max"),
        ("random: {samples: 0, parameters: {lora.rank: [4]}}\n", "`samples` must be a positive integer"),
        (
            "fixed: {train.stepz: 3}\nruns: [{}]\n",
            "fixed: unknown config key `train.stepz`; did you mean",
        ),
        ("- 1\n", "the top level must be a mapping"),
        ("grid: [\n", "not valid YAML"),
    ],
)
def test_bad_sweep_files_fail_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _sweep_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_example_sweep_file_loads() -> None:
    sweep = load_sweep(REPO / "configs/examples/sweeps/tiny_rank_lr.yaml")
    assert [run.name for run in sweep.runs] == ["rank4_lr3e-4", "rank4_lr1e-3", "rank8_lr3e-4", "rank8_lr1e-3"]
