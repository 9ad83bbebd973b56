"""Image-caption data: the folder, JSONL and WebDataset layouts, pixels, fingerprints and the errors users meet."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from perceptual_diffusion.data.caption_formats import load_captions
from perceptual_diffusion.data.captions import CaptionData, CaptionItem
from perceptual_diffusion.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# (stem, colour, caption) for three solid images, deliberately not in sorted order
SAMPLES = [("b", GREEN, "a green square"), ("a", RED, "a red square"), ("c", BLUE, "a blue square")]
SORTED = sorted(SAMPLES)


def _png(colour, size=(12, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _wide() -> bytes:
    """48x16: red left third, blue middle, green right third."""
    img = Image.new("RGB", (48, 16), RED)
    img.paste(BLUE, (16, 0, 32, 16))
    img.paste(GREEN, (32, 0, 48, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, samples=SAMPLES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, colour, caption in samples:
        (root / f"{stem}.png").write_bytes(_png(colour))
        (root / f"{stem}.txt").write_text(f"  {caption}\n")
    return root


def _jsonl(root: Path, samples=SAMPLES, name="metadata.jsonl") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (stem, colour, caption) in enumerate(samples):
        (root / "img" / f"{stem}.png").write_bytes(_png(colour))
        key = "file_name" if i % 2 == 0 else "image"
        text = "text" if i % 2 == 0 else "caption"
        lines.append(json.dumps({key: f"img/{stem}.png", text: caption}))
    (root / name).write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")  # a blank line is ignored
    return root / name


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(root: Path, samples=SORTED) -> Path:
    """Two shards, each sample's caption in a different kind of member."""
    first, second = samples[:2], samples[2:]
    _tar(
        root / "shard-0000.tar",
        [(f"{s}.png", _png(c)) for s, c, _ in first[:1]]
        + [(f"{first[0][0]}.txt", first[0][2].encode())]
        + [
            (f"{first[1][0]}.png", _png(first[1][1])),
            (f"{first[1][0]}.json", json.dumps({"caption": first[1][2]}).encode()),
        ],
    )
    _tar(
        root / "shard-0001.tar",
        [(f"sub/{s}.caption", cap.encode()) for s, _, cap in second]
        + [(f"sub/{s}.png", _png(c)) for s, c, _ in second],
    )
    return root


def _solid(images: torch.Tensor, colour) -> None:
    expected = torch.tensor(colour, dtype=torch.float32).div(127.5).sub(1.0)
    assert torch.allclose(images.mean(dim=(-1, -2)), expected, atol=0.02)


# ---------------------------------------------------------------------------------------------------------------


def test_folder_loads_sorted_pairs(tmp_path):
    data = load_captions(str(_folder(tmp_path / "d")), format="folder")
    assert isinstance(data, CaptionData) and len(data) == 3 and data.name == "d"
    assert data.captions == [c for _, _, c in SORTED]  # sorted by path, whitespace stripped
    assert data.items[0] == CaptionItem(str(tmp_path / "d" / "a.png"), "a red square")
    images = data.load_images([0, 1, 2], 8)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    for img, (_, colour, _) in zip(images, SORTED):
        _solid(img, colour)


def test_folder_recurses_and_orders_by_relative_path(tmp_path):
    root = tmp_path / "d"
    _folder(root / "z", [("a", RED, "z/a")])
    _folder(root / "m", [("b", GREEN, "m/b")])
    _folder(root, [("n", BLUE, "n")])
    assert load_captions(str(root)).captions == ["m/b", "n", "z/a"]


def test_jsonl_file_and_directory(tmp_path):
    path = _jsonl(tmp_path)
    for data in (load_captions(str(path)), load_captions(str(tmp_path)), load_captions(str(path), format="jsonl")):
        assert data.captions == [c for _, _, c in SAMPLES]  # file order, both key spellings
        for i, (_, colour, _) in enumerate(SAMPLES):
            _solid(data.load_image(i, 8), colour)


def test_jsonl_absolute_paths_and_custom_name(tmp_path):
    img = tmp_path / "elsewhere" / "x.png"
    img.parent.mkdir()
    img.write_bytes(_png(RED))
    (tmp_path / "train.jsonl").write_text(json.dumps({"file_name": str(img), "text": "red"}) + "\n")
    data = load_captions(str(tmp_path / "train.jsonl"))
    assert data.captions == ["red"] and data.name == "train"
    _solid(data.load_image(0, 4), RED)


def test_webdataset_single_dir_and_glob(tmp_path):
    root = _shards(tmp_path / "shards")
    by_dir = load_captions(str(root))
    assert by_dir.captions == [c for _, _, c in SORTED]
    assert by_dir.items[2].source == f"{root / 'shard-0001.tar'}:sub/c.png"
    assert load_captions(str(root / "shard-*.tar")).captions == by_dir.captions
    single = load_captions(str(root / "shard-0000.tar"), format="webdataset")
    assert single.captions == by_dir.captions[:2]
    for i, (_, colour, _) in enumerate(SORTED):
        _solid(by_dir.load_image(i, 8), colour)


def test_webdataset_matches_folder_pixels_in_random_order(tmp_path):
    colours = [(10 * i, 255 - 20 * i, 7 * i) for i in range(6)]
    samples = [(f"{i:06d}", c, f"caption {i}") for i, c in enumerate(colours)]
    folder = load_captions(str(_folder(tmp_path / "f", samples)))
    members = []
    for i, (stem, colour, caption) in enumerate(samples):
        image = _wide() if i == 3 else _png(colour, size=(20 + i, 14))
        (tmp_path / "f" / f"{stem}.png").write_bytes(image)
        members += [(f"{stem}.png", image), (f"{stem}.txt", caption.encode())]
    _tar(tmp_path / "w" / "a.tar", members[:6])
    _tar(tmp_path / "w" / "b.tar", members[6:])
    wds = load_captions(str(tmp_path / "w"))
    assert wds.captions == folder.captions
    order = torch.tensor([5, 0, 3, 3, 1, 4, 2])
    assert torch.equal(wds.load_images(order, 8), folder.load_images(order, 8))


def test_webdataset_after_fork(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    data = load_captions(str(_shards(tmp_path)))
    parent = data.load_images([0, 2], 8)  # opens the shard handles before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = torch.equal(data.load_images([2, 1, 0], 8)[[2, 0]], parent)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert torch.equal(data.load_images([0, 2], 8), parent)


def test_webdataset_skips_incomplete_samples_with_one_warning(tmp_path):
    shard = _tar(
        tmp_path / "s.tar",
        [("a.png", _png(RED)), ("a.txt", b"red"), ("b.png", _png(GREEN)), ("c.txt", b"orphan"), ("d.json", b"{}")],
    )
    with pytest.warns(UserWarning, match="skipped 3 of 4 samples") as record:
        data = load_captions(str(shard))
    assert len(record) == 1 and data.captions == ["red"]


def test_center_crop_keeps_the_middle(tmp_path):
    (tmp_path / "w.png").write_bytes(_wide())
    (tmp_path / "w.txt").write_text("wide")
    data = load_captions(str(tmp_path))
    _solid(data.load_image(0, 16), BLUE)  # no resize at 16: exactly the middle third
    small = data.load_image(0, 8)  # resized 48x16 -> 24x8, then the middle 8 columns
    _solid(small[:, :, 2:6], BLUE)
    tall = Image.new("RGB", (10, 30), RED)
    tall.paste(GREEN, (0, 10, 10, 20))
    tall.save(tmp_path / "w.png")
    _solid(load_captions(str(tmp_path)).load_image(0, 10), GREEN)


def test_grey_and_transparent_images_become_rgb(tmp_path):
    (tmp_path / "g.png").write_bytes(_png(128, mode="L"))
    (tmp_path / "t.png").write_bytes(_png((0, 0, 0, 0), mode="RGBA"))  # transparent: composited over white
    for stem in "gt":
        (tmp_path / f"{stem}.txt").write_text(stem)
    images = load_captions(str(tmp_path)).load_images([0, 1], 4)
    assert images.shape == (2, 3, 4, 4)
    _solid(images[0], (128, 128, 128))
    _solid(images[1], (255, 255, 255))


def test_auto_detection(tmp_path):
    assert load_captions(str(_folder(tmp_path / "f"))).items[0].source.endswith("a.png")
    _jsonl(tmp_path / "j")
    (tmp_path / "j" / "img" / "a.txt").write_text("not used: metadata.jsonl wins")
    assert load_captions(str(tmp_path / "j")).captions == [c for _, _, c in SAMPLES]
    assert load_captions(str(_shards(tmp_path / "w"))).items[0].source.endswith("shard-0000.tar:a.png")


def test_fingerprint(tmp_path):
    one, two = _folder(tmp_path / "one"), _folder(tmp_path / "two")
    fp = load_captions(str(one)).fingerprint()
    assert fp.startswith("3:") and len(fp.split(":")[1]) == 16
    assert load_captions(str(two)).fingerprint() == fp  # identical data elsewhere
    (two / "b.txt").write_text("a different caption")
    changed_caption = load_captions(str(two)).fingerprint()
    assert changed_caption != fp
    data = load_captions(str(one))
    (one / "c.png").write_bytes(_png((0, 0, 254)))
    assert data.fingerprint() == fp  # digests are taken while indexing: the data as it was loaded
    assert load_captions(str(one)).fingerprint() != fp  # a changed image, loaded again
    shards = load_captions(str(_shards(tmp_path / "w")))
    assert shards.fingerprint() == shards.fingerprint() and shards.fingerprint().startswith("3:")


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="caption data .*nope does not exist"):
        load_captions(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no files match the shard pattern"):
        load_captions(str(tmp_path / "nope-*.tar"))


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no images .* found under"):
        load_captions(str(tmp_path))


def test_image_without_caption(tmp_path):
    _folder(tmp_path)
    (tmp_path / "b.txt").unlink()
    (tmp_path / "zz.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"2 of 4 images .* have no caption, e\.g\. .*b\.png .*add a same-name \.txt"):
        load_captions(str(tmp_path))


def test_malformed_jsonl_line(tmp_path):
    path = _jsonl(tmp_path)
    path.write_text(path.read_text() + '{"file_name": "img/a.png", "text": \n')
    with pytest.raises(UserError, match=r"metadata\.jsonl line 5 is not valid JSON"):
        load_captions(str(tmp_path))
    path.write_text('{"file_name": "img/a.png"}\n')
    with pytest.raises(UserError, match=r"line 1 has no caption"):
        load_captions(str(path))
    path.write_text('["img/a.png", "x"]\n')
    with pytest.raises(UserError, match=r"line 1 is not a JSON object"):
        load_captions(str(path))


def test_jsonl_missing_image(tmp_path):
    path = _jsonl(tmp_path)
    (tmp_path / "img" / "c.png").unlink()
    with pytest.raises(UserError, match=r"metadata\.jsonl line 4 names img/c\.png, but .* does not exist"):
        load_captions(str(path))


def test_not_a_tar(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(UserError, match=r"bad\.tar is not a readable uncompressed tar file"):
        load_captions(str(tmp_path / "bad.tar"))


def test_no_samples(tmp_path):
    shard = _tar(tmp_path / "s.tar", [("a.txt", b"caption only")])
    with warnings.catch_warnings(), pytest.raises(UserError, match="no image-caption pairs found"):
        warnings.simplefilter("ignore")
        load_captions(str(shard))
    (tmp_path / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no image-caption pairs found"):
        load_captions(str(tmp_path))


def test_unknown_options(tmp_path):
    with pytest.raises(UserError, match="unknown caption format 'csv'"):
        load_captions(str(tmp_path), format="csv")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="on_bad_image must be"):
        load_captions(str(tmp_path), on_bad_image="ignore")


@pytest.mark.parametrize("layout", ["folder", "jsonl", "webdataset"])
def test_corrupt_image(tmp_path, layout):
    if layout == "folder":
        path = _folder(tmp_path)
        (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif layout == "jsonl":
        path = _jsonl(tmp_path)
        (tmp_path / "img" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    else:
        path = _tar(
            tmp_path / "s.tar",
            [("a.png", _png(RED)), ("a.txt", b"red"), ("b.png", b"\x89PNG\r\n\x1a\n garbage"), ("b.txt", b"g")],
        )
    with pytest.raises(UserError, match=r"cannot read image .*b\.png: .*pass --on-bad-image skip"):
        load_captions(str(path), on_bad_image="error")
    with pytest.warns(UserWarning, match=r"skipped 1 of \d+ images .* could not be read, e\.g\. .*b\.png"):
        data = load_captions(str(path))
    assert len(data) == (1 if layout == "webdataset" else 2)
    assert all("b.png" not in item.source for item in data.items)


def test_image_unreadable_after_loading(tmp_path):
    data = load_captions(str(_folder(tmp_path)))
    (tmp_path / "b.png").write_bytes(b"broken now")
    with pytest.raises(UserError, match=r"cannot read image .*b\.png"):
        data.load_image(1, 8)
    (tmp_path / "b.png").unlink()
    with pytest.raises(UserError, match=r"cannot read image .*b\.png"):
        data.load_images([0, 1], 8)


def test_jsonl_line_nested_deeper_than_the_stack_is_one_line(tmp_path):
    path = _jsonl(tmp_path)
    path.write_text(path.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match=r"metadata\.jsonl line 5 is nested too deeply"):
        load_captions(str(path))
