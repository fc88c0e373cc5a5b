"""Bad input to `kontext-lora train` ends in one line on stderr and exit code 2, never a traceback.

Each case runs the real CLI in a subprocess. Every case fails before training starts, but one that gets past the
config still pays ~5 s of imports (torch, diffusers, accelerate), so the module fixture starts them all at once
and each test waits for its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@dataclass
class Case:
    """One CLI run: its command line, and (once finished) its stderr and exit code."""

    argv: list[str]
    process: subprocess.Popen | None = None
    stderr: str = ""
    returncode: int | None = None

    def result(self) -> Case:
        if self.returncode is None:
            assert self.process is not None
            _, self.stderr = self.process.communicate(timeout=TIMEOUT_S)
            self.returncode = self.process.returncode
        return self


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _valid_data(root: Path) -> Path:
    _png(root / "control" / "a.png", 0)
    _png(root / "target" / "a.png", 1)
    (root / "target" / "a.txt").write_text("make it black and white")
    return root


def _config(path: Path, data: Path, pretrained: Path, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"model:\n  pretrained: {pretrained}\n  build_tiny_if_missing: false\n  dtype: float32\n"
        f"data:\n  datasets:\n    - path: {data}\n  resolution: 64\n"
        f"output:\n  dir: {path.parent / 'run'}\n"
        f"logging:\n  report_to: none\n{extra}"
    )
    return path


def _module_cli(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "kontext_lora.cli", "train", "--config", str(config), *overrides]


NO_MODEL = "does-not-exist"  # model.pretrained of every case: a data error must be reported before it


def _unknown_key(root: Path) -> list[str]:
    return _module_cli(_config(root / "job.yaml", _valid_data(root / "data"), root / NO_MODEL, "train:\n  lrr: 1\n"))


def _unknown_key_via_train_py(root: Path) -> list[str]:
    config = _config(root / "job.yaml", _valid_data(root / "data"), root / NO_MODEL)
    return [sys.executable, "train.py", "--config", str(config), "lora.rnak=8"]


def _wrong_type(root: Path) -> list[str]:
    return _module_cli(
        _config(root / "job.yaml", _valid_data(root / "data"), root / NO_MODEL, "train:\n  steps: abc\n")
    )


def _missing_config_file(root: Path) -> list[str]:
    return _module_cli(root / "nowhere" / "job.yaml")


def _missing_control(root: Path) -> list[str]:
    _png(root / "data" / "target" / "a.png", 1)
    (root / "data" / "control").mkdir()
    return _module_cli(_config(root / "job.yaml", root / "data", root / NO_MODEL))


def _corrupt_image(root: Path) -> list[str]:
    _png(root / "data" / "control" / "a.png", 0)
    (root / "data" / "target").mkdir()
    (root / "data" / "target" / "a.png").write_bytes(np.random.default_rng(2).bytes(4096))
    return _module_cli(_config(root / "job.yaml", root / "data", root / NO_MODEL))


def _empty_data(root: Path) -> list[str]:
    (root / "data").mkdir()
    return _module_cli(_config(root / "job.yaml", root / "data", root / NO_MODEL))


def _missing_model(root: Path) -> list[str]:
    return _module_cli(_config(root / "job.yaml", _valid_data(root / "data"), root / NO_MODEL))


def _readme_accelerate_launch(root: Path) -> list[str]:
    """The README's own `accelerate launch` flags (the accelerate of this interpreter), on a config with a typo."""
    readme = (REPO / "README.md").read_text()
    flags = re.search(r"accelerate launch (.*?)train\.py --config", readme).group(1).split()  # type: ignore[union-attr]
    config = _config(root / "job.yaml", _valid_data(root / "data"), root / NO_MODEL, "train:\n  steps: abc\n")
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "train.py", "--config", str(config)]


CASES = {
    "unknown_key": _unknown_key,
    "unknown_key_via_train_py": _unknown_key_via_train_py,
    "wrong_type": _wrong_type,
    "missing_config_file": _missing_config_file,
    "missing_control": _missing_control,
    "corrupt_image": _corrupt_image,
    "empty_data": _empty_data,
    "missing_model": _missing_model,
    "readme_accelerate_launch": _readme_accelerate_launch,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Path]]:
    """Build each case's files, start every CLI process at once, and return {name: (case, folder of its files)}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cases: dict[str, tuple[Case, Path]] = {}
    for name, build in CASES.items():
        root = tmp_path_factory.mktemp(name)
        case = Case(build(root))
        case.process = subprocess.Popen(
            case.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        cases[name] = (case, root)
    yield cases
    for case, _ in cases.values():
        if case.process is not None and case.process.poll() is None:
            case.process.kill()
            case.process.communicate()


def _user_error(case: Case) -> str:
    """Assert the run ended as a user error and return its one-line message (without the prefix)."""
    case = case.result()
    assert "Traceback" not in case.stderr, case.stderr
    assert case.returncode == 2, case.stderr
    last = [line for line in case.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("kontext-lora: error: "), case.stderr
    return last.removeprefix("kontext-lora: error: ")


def test_unknown_config_key(runs):
    message = _user_error(runs["unknown_key"][0])
    assert message.startswith("unknown config key `train.lrr`; did you mean `train.lr`?")


def test_unknown_override_key_through_train_py_shim(runs):
    message = _user_error(runs["unknown_key_via_train_py"][0])
    assert message.startswith("unknown config key `lora.rnak`; did you mean `lora.rank`?")


def test_wrong_type(runs):
    message = _user_error(runs["wrong_type"][0])
    assert message.startswith("config key `train.steps`: value 'abc' (str) is not a valid int")


def test_missing_config_file(runs):
    case, root = runs["missing_config_file"]
    message = _user_error(case)
    assert message == f"config file not found: {root / 'nowhere' / 'job.yaml'}"


def test_missing_control_image(runs):
    case, root = runs["missing_control"]
    message = _user_error(case)
    data = root / "data"
    assert f"target image {data / 'target' / 'a.png'} has no control image" in message
    assert str(data / "control" / "a") in message


def test_corrupt_image_fails_at_verify_before_the_model_is_loaded(runs):
    case, root = runs["corrupt_image"]
    message = _user_error(case)
    assert message.startswith(f"cannot read image {root / 'data' / 'target' / 'a.png'}")
    # model.pretrained does not exist and may not be built: reaching the model would have named it instead.
    assert "model.pretrained" not in case.stderr
    assert not (root / NO_MODEL).exists()


def test_empty_data_folder(runs):
    case, root = runs["empty_data"]
    message = _user_error(case)
    assert message.startswith(f"dataset folder {root / 'data'} has neither metadata.jsonl nor control/ and target/")


def test_missing_model_folder(runs):
    case, root = runs["missing_model"]
    message = _user_error(case)
    assert message.startswith(f"config key `model.pretrained`: {root / NO_MODEL} is not a diffusers")
    assert "model.build_tiny_if_missing=true" in message
    assert not (root / NO_MODEL).exists()


def test_accelerate_launch_as_the_readme_writes_it_ends_in_the_one_line_error(runs):
    """No launcher traceback after the error (accelerate's -q) and no warning about guessed --num_processes etc.
    (a config file that states them)."""
    case = runs["readme_accelerate_launch"][0].result()
    assert case.returncode != 0
    assert "Traceback" not in case.stderr and "CalledProcessError" not in case.stderr, case.stderr
    assert "were not passed to `accelerate launch`" not in case.stderr, case.stderr
    lines = [line for line in case.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("kontext-lora: error: config key `train.steps`: value 'abc'"), case.stderr
    assert sum(line.startswith("kontext-lora: error:") for line in lines) == 1, case.stderr


def test_config_error_fails_before_the_heavy_imports(tmp_path: Path):
    config = _config(tmp_path / "job.yaml", tmp_path / "data", tmp_path / NO_MODEL, "train:\n  steps: abc\n")
    code = (
        "import sys\n"
        "from kontext_lora.cli import main\n"
        f"assert main(['train', '--config', {str(config)!r}]) == 2\n"
        "assert 'torch' not in sys.modules, 'a config typo should not wait for torch to import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().startswith("kontext-lora: error: config key `train.steps`")


def test_optional_dependency_import_noise_is_silenced() -> None:
    """Importing PEFT and diffusers (which import torchao when it is installed, as in [dev]) prints torchao's
    extension-loading and Enum-registration messages; after `quiet_dependency_noise` (cli.main's first call) none."""
    pytest.importorskip("torchao")
    script = "import peft, diffusers.quantizers.torchao.torchao_quantizer"
    quiet = "from kontext_lora.cli import quiet_dependency_noise; quiet_dependency_noise(); " + script
    noisy, silenced = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
        for code in (script, quiet)
    )
    assert noisy.returncode == silenced.returncode == 0, noisy.stderr + silenced.stderr
    assert "register_constant" in noisy.stderr  # without the call the messages appear: the check below can fail
    for message in ("Failed to load", "register_constant", "Unable to import `torchao`"):
        assert message not in silenced.stderr, silenced.stderr


# ------------------------------------------------------------------------- in-process: messages of the other commands


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], prefix: str = "kontext-lora: error: ") -> str:
    """Run `kontext-lora argv` in this process; assert exit code 2 and one stderr line, and return its message."""
    from kontext_lora.cli import main

    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0].removeprefix(prefix)


def _infer_argv(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    image = str(REPO / "data_examples" / "bw" / "control" / "coffee.jpg")
    return ["infer", "--model", str(model), "--image", image, "--prompt", "x", "--out", str(tmp_path / "o.png"), *extra]


def test_infer_lora_typo_names_the_missing_file(tiny_model_dir: Path, tmp_path: Path, capsys):
    typo = tmp_path / "pytorch_lora_weigths.safetensors"
    message = _one_line_error(capsys, _infer_argv(tiny_model_dir, tmp_path, "--lora", str(typo)))
    assert message == f"--lora {typo}: no such file; give a LoRA .safetensors file (or a folder with one)"
    assert not (tmp_path / "o.png").exists()


def test_infer_missing_model_speaks_of_its_own_arguments(tmp_path: Path, capsys):
    missing = tmp_path / "tiny-kontext"
    message = _one_line_error(capsys, _infer_argv(missing, tmp_path))
    assert message.startswith(f"--model {missing}: not a diffusers pipeline folder (no model_index.json)")
    assert f"kontext-lora make-tiny-model {missing}" in message
    assert "model.pretrained" not in message and "build_tiny_if_missing" not in message


def test_plan_names_vram_when_nothing_fits(capsys):
    config = str(REPO / "configs" / "examples" / "kontext_dev.yaml")
    message = _one_line_error(capsys, ["plan", "--config", config, "--vram", "4"])
    assert message.startswith("--vram: nothing fits 4 GiB; the smallest candidate")
    assert "budget_gib" not in message


def test_merge_bad_scale_blames_the_scale(tmp_path: Path, capsys):
    lora = tmp_path / "edit.safetensors"
    lora.write_bytes(b"")  # never read: the argument is refused while parsing
    argv = ["merge", "--base", str(tmp_path), "--lora", f"{lora}:abc", "--out", str(tmp_path / "merged")]
    message = _one_line_error(capsys, argv, prefix="kontext-lora merge: error: ")
    assert message == (
        f"argument --lora: {lora}:abc: the strength after ':' must be a number, not 'abc' (FILE[:SCALE], e.g. "
        f"{lora}:0.8) (see --help)"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.datasets.5.path=x", "override 'data.datasets.5.path=x': `data.datasets` has 1 item(s), so [5] is past"),
        ("data.datasets[0].pth=x", "unknown config key `data.datasets[0].pth`; did you mean `data.datasets[0].path`?"),
    ],
)
def test_list_item_override_errors_through_the_cli(override: str, expected: str, capsys):
    config = str(REPO / "configs" / "examples" / "tiny_bw.yaml")
    assert _one_line_error(capsys, ["train", "--config", config, override]).startswith(expected)


def test_config_folder_and_yaml_errors_through_the_cli(tmp_path: Path, capsys):
    folder = REPO / "configs" / "examples"
    message = _one_line_error(capsys, ["train", "--config", str(folder)])
    first = ", ".join(sorted(path.name for path in folder.glob("*.yaml"))[:3])
    assert message == f"config file {folder} is a folder; give a YAML file (it holds {first})"
    twice = tmp_path / "job.yaml"
    twice.write_text("extends: base.yaml\ntrain:\n  steps: 4\nvalidation:\n  every: 0\ntrain:\n  lr: 1\n")
    message = _one_line_error(capsys, ["train", "--config", str(twice)])
    assert message == f"{twice}, line 6: duplicate key `train` (a key may appear once per section; remove one)"


INFER_SCRIPT = """
import sys
from kontext_lora.cli import main
from kontext_lora.infer import run_inference
model, lora, image, out, quiet = sys.argv[1:]
if quiet == "cli":  # the command as users run it (cli.main quiets first)
    sys.exit(main(["infer", "--model", model, "--lora", lora, "--image", image, "--prompt", "x", "--out", out,
                   "--size", "32", "--steps", "1", "--dtype", "float32"]))
run_inference(model, image, "x", out, lora=lora, steps=1, dtype="float32", size=32)
"""


def test_infer_prints_no_dependency_noise(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers' torchvision fallback note, its per-model "Loading weights" bars inside diffusers' bar, and
    diffusers' "No LoRA keys associated to CLIPTextModel" (a Kontext LoRA never has any) do not reach the user."""
    from tests.export.conftest import save_adapter_case

    lora = save_adapter_case(tmp_path / "lora").path
    image = str(REPO / "data_examples" / "bw" / "control" / "coffee.jpg")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    processes = {
        mode: subprocess.Popen(
            [
                sys.executable,
                "-c",
                INFER_SCRIPT,
                str(tiny_model_dir),
                str(lora),
                image,
                str(tmp_path / f"{mode}.png"),
                mode,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for mode in ("cli", "library")
    }
    stderr = {}
    for mode, process in processes.items():
        _, stderr[mode] = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0, stderr[mode]
        assert (tmp_path / f"{mode}.png").is_file()
        assert "Loading weights" not in stderr[mode], stderr[mode]
    # Without cli.main's quieting the two messages do appear: the checks below can fail.
    assert "No LoRA keys associated" in stderr["library"]
    if importlib.util.find_spec("torchvision") is None:  # the fallback note exists only without torchvision
        assert "requires torchvision" in stderr["library"]
    assert "requires torchvision" not in stderr["cli"] and "No LoRA keys associated" not in stderr["cli"], stderr["cli"]
    assert "Loading pipeline components" in stderr["cli"]  # diffusers' one bar over the components stays
