"""The README's example job learns its edit: the embedded tiny editor learns "make it black and white".

The job is the one a user runs first (configs/examples/tiny_bw.yaml, through `train`, validation before the first
step and at the end); the figures are read from what it wrote (metrics.jsonl) and from outside the trainer by
scripts/eval_edit.py (the saved model folder loaded by `FluxKontextPipeline`, the adapter by `load_lora_weights`),
on the held-out triple only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kontext_lora.config import load_config
from kontext_lora.train.loop import train
from scripts.eval_edit import compare, load_pairs

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "examples" / "tiny_bw.yaml"
DATA = REPO / "data_examples" / "bw"


def test_example_job_learns_black_and_white_from_its_control(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(EXAMPLE, [f"model.pretrained={tmp_path / 'tiny-kontext'}", f"output.dir={out}",
                                "logging.report_to=none", "output.export_formats=[]"])  # fmt: skip
    start = time.perf_counter()
    adapter = train(cfg)
    seconds = time.perf_counter() - start

    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "heldout_loss" in r]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == cfg.train.steps
    (heldout,) = [p.stem.removeprefix("heldout-") for p in (out / "validation" / "step-000000").glob("heldout-*")]
    pairs = load_pairs(DATA, cfg.data.resolution)
    heldout_pairs, others = [p for p in pairs if p.name == heldout], [p for p in pairs if p.name != heldout]
    figures = compare(cfg.model.pretrained, adapter, heldout_pairs, others, cfg.data.resolution, guidance=1.0,
                      length=cfg.model.max_sequence_length)  # fmt: skip
    base, tuned = figures["base"], figures["adapter"]
    report = f"held-out {heldout}: base {base} -> adapter {tuned}; run {first} -> {last} ({seconds:.0f} s)"
    print(report)
    # The held-out triple's sampled edit turns black and white, towards its target ...
    assert tuned["saturation"] <= 0.2 * base["saturation"], report
    assert tuned["psnr"] >= base["psnr"] + 5.0, report
    # ... its loss falls, in the run's own record and from outside, and depends on its own control.
    assert last["heldout_loss"] <= 0.7 * first["heldout_loss"], report
    assert tuned["loss_own"] <= 0.7 * base["loss_own"], report
    assert tuned["loss_other"] >= 1.3 * tuned["loss_own"], report
