"""No command replaces what it did not make: folders carry a marker naming the command that made them, runs and
exports are recognised by their files, and a single output file is replaced only when it is the command's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from perceptual_diffusion import cli
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation import classifier
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import ownership


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# claim_dir


def test_a_new_folder_is_claimed_with_a_marker_and_a_rerun_of_the_same_kind_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "a" / "cmp"
    assert ownership.claim_dir(out, "experiment", command="compare") == out
    assert ownership.read_marker(out) == ownership.Marker("experiment", "compare", None)
    (out / "budget.json").write_text("{}")
    (out / "seed0").mkdir()
    ownership.claim_dir(out, "experiment", command="ablate")  # ablate shares compare's folder
    assert ownership.read_marker(out).command == "compare", "the maker stays recorded"


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: (d / "notes.md").write_text("mine"), "is not empty and was not made by `compare`"),
        (lambda d: ownership.claim_dir(d, "shapes-captions", command="latent shapes-captions"), "was made by"),
        (lambda d: [(d / "config.json").write_text("{}"), (d / "checkpoints").mkdir()], "is a run directory"),
        (lambda d: (d / "model_index.json").write_text("{}"), "is a diffusers export"),
    ],
    ids=["foreign-files", "other-kind", "run", "export"],
)
def test_a_folder_it_did_not_make_is_refused_untouched(setup, fragment: str, tmp_path: Path) -> None:
    out = tmp_path / "target"
    out.mkdir()
    setup(out)
    before = _tree(out)
    for force in (False, True):
        with pytest.raises(UserError, match=fragment):
            ownership.claim_dir(out, "experiment", force, command="compare")
    assert _tree(out) == before


def test_a_file_is_refused_and_a_listed_folder_refuses_unlisted_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        ownership.claim_dir(tmp_path / "f", "experiment")
    out = tmp_path / "listed"
    ownership.claim_dir(out, "shapes-captions", files=["000000.png"])
    (out / "000000.png").write_text("ours")
    (out / f".000001.png.abc{ckpt.TMP_SUFFIX}").write_text("an atomic write's temporary: ours too")
    ownership.claim_dir(out, "shapes-captions", files=["000000.png"])
    (out / "holiday.jpg").write_text("the user's")
    with pytest.raises(UserError, match=r"did not make \(holiday.jpg\)"):
        ownership.claim_dir(out, "shapes-captions", files=["000000.png"])


def test_a_legacy_folder_is_adopted_and_force_empties_only_a_folder_of_its_kind(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "budget.json").write_text("{}")
    (out / "report.md").write_text("# old")
    with pytest.raises(UserError, match="was not made by"):
        ownership.claim_dir(out, "experiment", command="compare")
    ownership.claim_dir(out, "experiment", command="compare", legacy=["budget.json"])
    assert ownership.read_marker(out).kind == "experiment" and (out / "report.md").exists()
    ownership.claim_dir(out, "experiment", force=True, command="compare")
    assert sorted(p.name for p in out.iterdir()) == [ownership.MARKER]


def test_an_unwritable_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError, match="cannot write into --out"):
        ownership.claim_dir(tmp_path / "plain" / "sub", "experiment")


# ---------------------------------------------------------------------------------------------------------------
# latent shapes-captions


def test_shapes_captions_never_replaces_the_users_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "000000.png").write_bytes(b"my photo")
    (out / "000000.txt").write_text("my caption")
    before = _tree(out)
    assert cli.main(["latent", "shapes-captions", "--out", str(out), "--every", "400"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "was not made by" in err, err
    assert _tree(out) == before


def test_shapes_captions_reruns_into_its_own_folder_with_exactly_what_was_asked(tmp_path: Path, capsys) -> None:
    out = tmp_path / "captions"
    assert cli.main(["latent", "shapes-captions", "--out", str(out), "--every", "400"]) == 0
    assert sorted(p.name for p in out.glob("*.txt")) == ["000000.txt", "000400.txt", "000800.txt", "001200.txt"]
    assert json.loads((out / ownership.MARKER).read_text())["command"] == "latent shapes-captions"
    assert cli.main(["latent", "shapes-captions", "--out", str(out), "--every", "800"]) == 0
    assert sorted(p.name for p in out.glob("*.txt")) == ["000000.txt", "000800.txt"], "the earlier run's extras go"
    (out / "extra.png").write_bytes(b"added by hand")
    capsys.readouterr()
    assert cli.main(["latent", "shapes-captions", "--out", str(out)]) == 2
    assert "did not make (extra.png)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# train-classifier: checked before training


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """train_classifier replaced by a stub that writes a classifier-like file at once and records its calls."""
    calls: list[str] = []

    def stub(data: str, out: str, epochs: int | None = None, seed: int = 0) -> dict:
        calls.append(out)
        meta = {"config": json.dumps({"num_classes": 4}), "result": "{}"}
        save_file({"w": torch.zeros(1)}, out, metadata=meta)
        return {"test_accuracy": 1.0, "test_images": 1, "test_accuracy_noise_0.2": 1.0, "seconds": 0}

    monkeypatch.setattr(classifier, "train_classifier", stub)
    return calls


def _train_classifier(out: Path | str, *extra: str) -> list[str]:
    return ["train-classifier", "--data", "shapes", "--out", str(out), *extra]


def _runs_weights(tmp: Path) -> Path:
    ckpt.save_weights(tmp / "model.safetensors", {"w": torch.zeros(1)}, _run_config(), 3)
    return tmp / "model.safetensors"


def _folder(tmp: Path) -> Path:
    (tmp / "model.safetensors").mkdir()
    return tmp / "model.safetensors"


def _other_file(tmp: Path) -> Path:
    (tmp / "notes.safetensors").write_text("notes")
    return tmp / "notes.safetensors"


def _under_a_file(tmp: Path) -> Path:
    (tmp / "plain").write_text("x")
    return tmp / "plain" / "c.safetensors"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_runs_weights, "is not a classifier file that `train-classifier` made"),
        (_folder, "is a folder"),
        (_other_file, "is not a classifier file"),
        (_under_a_file, "is a file, not a folder"),
    ],
    ids=["a-runs-weights", "a-folder", "some-other-file", "under-a-file"],
)
def test_train_classifier_refuses_before_training(make, fragment: str, tmp_path: Path, no_training, capsys) -> None:
    target = make(tmp_path)
    before = _tree(tmp_path)
    for force in ([], ["--force"]):
        assert cli.main(_train_classifier(target, *force)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert no_training == [] and _tree(tmp_path) == before


def test_train_classifier_replaces_its_own_file_only_with_force(tmp_path: Path, no_training, capsys) -> None:
    out = tmp_path / "c.safetensors"
    assert cli.main(_train_classifier(out)) == 0
    assert cli.main(_train_classifier(out)) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert cli.main(_train_classifier(out, "--force")) == 0
    assert len(no_training) == 2
    assert cli.main(_train_classifier(tmp_path / "d.safetensors", "--epochs", "0")) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_a_shipped_classifier_is_recognised_as_one_of_its_files(tmp_path: Path, no_training, capsys) -> None:
    out = tmp_path / "shapes.safetensors"
    out.write_bytes(classifier.shipped_classifier_path("shapes").read_bytes())
    assert cli.main(_train_classifier(out)) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert cli.main(_train_classifier(out, "--force")) == 0 and no_training == [str(out)]


def _run_config():
    from _runs import tiny_config

    return tiny_config()
