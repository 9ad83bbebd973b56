"""Safe loading: weights are read with safetensors or ``torch.load(weights_only=True)``; a pickle that would execute
code is refused with a clear message, and a marker file proves the code never ran."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from _runs import CLI_TINY, evil_pickles, tiny_config

from perceptual_diffusion import cli
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    training.train(tiny_config(steps=2, checkpoint_every=1), run_dir)
    return run_dir


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def evil(tmp_path: Path, marker: Path) -> dict[str, Path]:
    return evil_pickles(tmp_path / "evil", marker)


def test_the_evil_pickle_really_runs_code_when_unpickled_unsafely(evil: dict[str, Path], marker: Path) -> None:
    """Positive control: without the safe loader the payload does create the marker."""
    pickle.loads(evil["raw-protocol2"].read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["raw-protocol2", "raw-protocol4", "torch-zip"])
def test_load_state_refuses_code_executing_pickle(evil: dict[str, Path], marker: Path, fmt: str) -> None:
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"refusing to load .*would import and call (builtins|_?io)\.open"):
        ckpt.load_state(evil[fmt])
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["raw-protocol2", "raw-protocol4", "torch-zip"])
def test_planted_state_in_run_dir_stops_resume(
    trained: Path, tmp_path: Path, evil: dict[str, Path], marker: Path, fmt: str, capsys
) -> None:
    """A planted newest state is an error, not a silent fall back to the previous good one."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.copy(evil[fmt], ckpt.state_path(run_dir, 5))
    argv = ["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "6", "--checkpoint-every", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refusing to load") and "state-00000005.pt" in err
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["raw-protocol2", "raw-protocol4", "torch-zip"])
@pytest.mark.parametrize("name", ["weights.pt", "model.safetensors"])
@pytest.mark.parametrize("role", ["--teacher", "--init-from", "sample"])
def test_evil_pickle_as_model_file_is_refused(
    tmp_path: Path, evil: dict[str, Path], marker: Path, fmt: str, name: str, role: str, capsys
) -> None:
    model = tmp_path / "given" / name
    model.parent.mkdir()
    shutil.copy(evil[fmt], model)
    if role == "sample":
        argv = ["sample", str(model), "-n", "1", "--steps", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"]
    else:
        argv = ["train", "--run-dir", str(tmp_path / "run"), *CLI_TINY, "--steps", "1", role, str(model)]
        argv += ["--loss", "self-perceptual"] if role == "--teacher" else []
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a safetensors weights file" in err and "Traceback" not in err
    assert not marker.exists()


def test_evil_pickle_as_run_dir_snapshot_is_refused(tmp_path: Path, evil: dict[str, Path], marker: Path) -> None:
    shutil.copy(evil["torch-zip"], tmp_path / ckpt.WEIGHTS_NAME)
    with pytest.raises(UserError, match="not a safetensors weights file"):
        loading.load_model(tmp_path)
    assert not marker.exists()


def test_states_hold_only_plain_data(trained: Path) -> None:
    """What we write loads under weights_only=True (so the safe path is the only path)."""
    state = ckpt.load_state(ckpt.list_states(trained)[-1])
    assert state["step"] == 2 and isinstance(state["config"], str)


class CallsTorchFunction:
    """A pickle that calls a torch function (not a tensor rebuilder): still code, still refused."""

    def __reduce__(self) -> tuple:
        import torch

        return (torch.ones, (2,))


def test_pickle_calling_a_torch_function_is_also_unsafe(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "state-00000001.pt"
    torch.save({"step": 1, "model": CallsTorchFunction(), "ema": {}, "optimizer": {}}, path)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="would import and call"):
        ckpt.load_state(path)
