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

    def stub(data: str, out: str, epochs: int | None = None, seed: int = 0, **options: object) -> dict:
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


# ---------------------------------------------------------------------------------------------------------------
# train --run-dir: a run is its own marker; anything else that holds files is refused before the data is read


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-step tiny run made by the CLI."""
    from _runs import CLI_TINY

    run_dir = tmp_path_factory.mktemp("owned") / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "1"]) == 0
    return run_dir


def _train_argv(run_dir: Path, *extra: str) -> list[str]:
    from _runs import CLI_TINY

    return ["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "2", *extra]


@pytest.fixture
def no_data_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the training data fails the test: a refused --run-dir must cost nothing, not even the data."""
    from perceptual_diffusion.training import latent as latent_training
    from perceptual_diffusion.training import loop

    def started(self) -> None:  # noqa: ANN001
        raise AssertionError("the data was read")

    monkeypatch.setattr(loop.PixelTask, "load", started)
    monkeypatch.setattr(latent_training.LatentTask, "load", started)


def _users_files(d: Path, run: Path) -> list[str]:
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return []


def _comparison(d: Path, run: Path) -> list[str]:
    ownership.claim_dir(d, "experiment", command="compare")
    (d / "budget.json").write_text("{}")
    return []


def _captions(d: Path, run: Path) -> list[str]:
    assert cli.main(["latent", "shapes-captions", "--out", str(d), "--every", "800"]) == 0
    return []


def _an_export(d: Path, run: Path) -> list[str]:
    assert cli.main(["export", str(run), "--out", str(d)]) == 0
    return []


def _foreign_config(d: Path, run: Path) -> list[str]:
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["BertModel"]}')  # a downloaded model's config
    return ["--override-config"]  # which once rewrote that config.json with the run's


def _weights_only(d: Path, run: Path) -> list[str]:
    d.mkdir()
    (d / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())  # a copy kept by the user
    return []


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_users_files, "is not empty and is not a run directory (it holds notes.txt)"),
        (_comparison, "was made by `perceptual-diffusion compare`, not by `train`"),
        (_captions, "was made by `perceptual-diffusion latent shapes-captions`"),
        (_an_export, "was made by `perceptual-diffusion export`"),
        (_foreign_config, "is not a run directory (it holds config.json)"),
        (_weights_only, "is not a run directory (it holds model.safetensors)"),
    ],
    ids=["users-files", "a-comparison", "shapes-captions", "an-export", "foreign-config-json", "weights-only"],
)
def test_train_refuses_a_folder_that_is_not_a_run_before_any_work(
    make, fragment: str, run: Path, tmp_path: Path, no_data_read, capsys
) -> None:
    """`train --run-dir DIR` into the user's own files, a comparison or an export once trained into it, mixing a run
    into their files (and --override-config replaced a foreign config.json)."""
    target = tmp_path / "target"
    extra = make(target, run)
    before = _tree(target)
    capsys.readouterr()
    assert cli.main(_train_argv(target, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert _tree(target) == before


def test_latent_train_refuses_the_same_folders(tmp_path: Path, no_data_read, capsys) -> None:
    target = tmp_path / "mine"
    _users_files(target, tmp_path)
    argv = ["latent", "train", "--run-dir", str(target), "--pretrained", "p", "--data-path", "d", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "is not empty and is not a run directory" in capsys.readouterr().err
    assert _tree(target) == {"notes.txt": b"mine"}


def test_train_resumes_a_run_holding_other_files_and_starts_in_new_or_empty_folders(run: Path, tmp_path: Path) -> None:
    """What must keep working: a run with the user's grids and notes in it resumes (they stay), an empty folder or
    one a killed run left with only its lock starts a run."""
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "notes.txt").write_text("kept")
    (resumed / "grid.png").write_bytes(b"a sample grid the user drew")
    assert cli.main(_train_argv(resumed)) == 0
    assert ckpt.weights_step(resumed / ckpt.WEIGHTS_NAME) == 2 and (resumed / "notes.txt").read_text() == "kept"
    (tmp_path / "empty").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").touch()
    for folder in ("empty", "locked", "new/nested"):
        assert cli.main(_train_argv(tmp_path / folder)) == 0
        assert ckpt.weights_step(tmp_path / folder / ckpt.WEIGHTS_NAME) == 2


# ---------------------------------------------------------------------------------------------------------------
# export and latent tiny: their folders carry a marker; --force replaces only a folder of their own kind


def test_export_and_latent_tiny_mark_their_folders_and_force_replaces_only_their_own(
    run: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from perceptual_diffusion.models.export import CONFIG_FILE

    export, tiny = tmp_path / "export", tmp_path / "tiny"
    assert cli.main(["export", str(run), "--out", str(export)]) == 0
    marker = ownership.read_marker(export)
    assert marker.kind == "export" and marker.command == "export" and CONFIG_FILE in marker.files
    assert cli.main(["export", str(run), "--out", str(export), "--force"]) == 0  # its own: replaced
    assert cli.main(["latent", "tiny", "--out", str(tiny)]) == 0
    assert ownership.read_marker(tiny).command == "latent tiny"
    assert cli.main(["latent", "tiny", "--out", str(tiny), "--force"]) == 0
    capsys.readouterr()
    for argv, fragment in (
        (["latent", "tiny", "--out", str(export), "--force"], "was made by `perceptual-diffusion export`"),
        (["export", str(run), "--out", str(tiny), "--force"], "was made by `perceptual-diffusion latent tiny`"),
    ):
        before = _tree(Path(argv[argv.index("--out") + 1]))
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
        assert _tree(Path(argv[argv.index("--out") + 1])) == before
    # A diffusers folder nobody here wrote (a downloaded pipeline) is never replaced; an export made before markers
    # existed (it has our config file) still is.
    downloaded, legacy = tmp_path / "downloaded", tmp_path / "legacy"
    shutil.copytree(tiny, downloaded)
    (downloaded / ownership.MARKER).unlink()
    assert cli.main(["export", str(run), "--out", str(downloaded), "--force"]) == 2
    assert "did not write" in capsys.readouterr().err and ownership.read_marker(downloaded) is None
    shutil.copytree(export, legacy)
    (legacy / ownership.MARKER).unlink()
    assert cli.main(["export", str(run), "--out", str(legacy), "--force"]) == 0
    assert ownership.read_marker(legacy).kind == "export"


# ---------------------------------------------------------------------------------------------------------------
# the latent cache folder


def test_the_latent_cache_folder_is_claimed_and_never_written_into_foreign_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perceptual_diffusion.training.latent import claim_cache_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"the user's")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (run / "checkpoints").mkdir()
    for folder, fragment in ((mine, "was not made by `latent cache`"), (run, "is a run directory")):
        before = _tree(folder)
        with pytest.raises(UserError, match=fragment):
            claim_cache_dir(folder)
        assert _tree(folder) == before
    legacy = tmp_path / "legacy"
    (legacy / "latents-0123456789abcdef0123").mkdir(parents=True)  # a cache made before markers existed
    assert claim_cache_dir(legacy) == legacy and ownership.read_marker(legacy).kind == "latent-cache"
    fresh = claim_cache_dir(tmp_path / "new")
    assert ownership.read_marker(fresh).command == "latent cache"

    def read_only(*args, **kwargs) -> None:  # noqa: ARG001
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ckpt, "atomic_write_text", read_only)
    assert claim_cache_dir(legacy) == legacy, "a cache already marked is only read: it may sit on a read-only disk"


def test_latent_cache_refuses_a_foreign_cache_dir_before_reading_the_data(tmp_path: Path, capsys) -> None:
    tiny = tmp_path / "tiny"
    assert cli.main(["latent", "tiny", "--out", str(tiny)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    argv = ["latent", "cache", "--pretrained", str(tiny), "--resolution", "16", "--device", "cpu"]
    capsys.readouterr()
    assert cli.main([*argv, "--data-path", str(tmp_path / "no-data-yet"), "--cache-dir", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cache-dir" in err and "was not made by `latent cache`" in err, err
    assert _tree(mine) == {"notes.txt": b"mine"}


# ---------------------------------------------------------------------------------------------------------------
# output files: never over or into what another command made


def _owned_layout(tmp: Path) -> Path:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (run / "samples").mkdir()
    export = tmp / "export"
    export.mkdir()
    (export / "model_index.json").write_text("{}")
    ownership.claim_dir(tmp / "cmp", "experiment", command="compare")
    (tmp / "cmp" / "report.md").write_text("# report")
    ownership.claim_dir(tmp / "caps", "shapes-captions", command="latent shapes-captions", files=["000000.png"])
    (tmp / "link.png").symlink_to(run / "config.json")
    return tmp


@pytest.mark.parametrize(
    ("target", "owner"),
    [
        ("run/config.json", "the run"),
        ("run/model.safetensors", "the run"),
        ("run/log.jsonl", "the run"),
        ("run/checkpoints/state-00000009.pt", "the run"),
        ("run/snapshots/x.safetensors", "the run"),
        ("link.png", "the run"),  # a symlink is followed: writing through it would replace the run's config
        ("export/unet/grid.png", "the diffusers export"),
        ("cmp/report.md", "which `perceptual-diffusion compare` made"),
        (f"cmp/{ownership.MARKER}", "which `perceptual-diffusion compare` made"),
        ("caps/new.png", "which `perceptual-diffusion latent shapes-captions` made"),
        ("run/grid.png", None),  # the user's own outputs beside a run are free
        ("run/samples/mine.png", None),
        ("cmp/grid.png", None),  # a new file in a folder filled as it goes mixes nothing
        ("elsewhere/grid.png", None),
    ],
)
def test_protected_output_names_what_a_file_would_replace(target: str, owner: str | None, tmp_path: Path) -> None:
    found = ownership.protected_output(_owned_layout(tmp_path) / target)
    assert found is None if owner is None else owner in found, found
