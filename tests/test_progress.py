"""Progress bars follow tqdm's environment: TQDM_DISABLE=1 silences every bar a run (or a sweep of runs) draws."""

from __future__ import annotations

import os
import subprocess
import sys

from kontext_lora.config import load_config

from .conftest import REPO

# The preflight bar (the data package) and a bar as training and caching draw it, both asked to show.
SCRIPT = (
    "from kontext_lora.config import load_config\n"
    "from kontext_lora.data.preflight import preflight\n"
    "from kontext_lora.progress import progress_bar\n"
    "preflight(load_config('configs/examples/tiny_bw.yaml').data, show_progress=True)\n"
    "for _ in progress_bar(range(3), desc='training', show=True): pass\n"
    "for _ in progress_bar(range(3), desc='hidden', show=False): pass\n"
)


def _stderr(**env: str) -> str:
    base = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_tqdm_disable_silences_the_bars() -> None:
    load_config(REPO / "configs" / "examples" / "tiny_bw.yaml")  # the script's config is valid here too
    shown = _stderr()
    assert "preflight:" in shown and "training:" in shown and "hidden" not in shown  # the bars draw without it
    silenced = _stderr(TQDM_DISABLE="1")
    assert "preflight:" not in silenced and "training:" not in silenced, silenced
