"""Tests of dcal.data: the synthetic benchmark is really fine-grained, loaders agree, validation names lines."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dcal.data as D
from dcal.data.glyphs import BENCHMARK_GLYPHS, INK_CELLS, _shifted, pretrain_glyphs
from dcal.data.probes import baseline_accuracies
from dcal.data.synthetic import cache_path
from dcal.data.transforms import BoxAware, build_transforms, default_transform

TINY = D.SyntheticSpec(num_classes=3, train_per_class=4, test_per_class=2)


@pytest.fixture(scope="module")
def bench() -> D.SyntheticData:
    """The default benchmark (2500 images, a few seconds)."""
    return D.generate(D.SyntheticSpec())


@pytest.fixture(scope="module")
def tiny() -> D.SyntheticData:
    return D.generate(TINY)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of boxes a, b (..., 4)."""
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


# ------------------------------------------------------------------------------------------- synthetic data


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="family"):
        D.SyntheticSpec(family="birds")
    with pytest.raises(ValueError, match="at most 12"):
        D.SyntheticSpec(num_classes=13)
    with pytest.raises(ValueError, match="part_size"):
        D.SyntheticSpec(part_size=40)
    assert D.SyntheticSpec(scale_range=[0.9, 1.0]) == D.SyntheticSpec(scale_range=(0.9, 1.0))  # YAML gives lists


def test_glyph_invariants():
    _, pre = pretrain_glyphs(48)
    for g in [*BENCHMARK_GLYPHS.values(), *pre]:
        assert g.sum() == INK_CELLS  # equal ink: colour histograms carry no class information
        assert np.array_equal(g, g[:, ::-1])  # flip augmentation keeps the class
    shifted = [s for g in BENCHMARK_GLYPHS.values() for s in _shifted(g)]
    assert min(int((p ^ s).sum()) for p in pre for s in shifted) >= 6  # pretrain never sees benchmark shapes


def test_generation_is_deterministic(tiny):
    again = D.generate(TINY)
    for k in ("images", "labels", "part_boxes", "object_boxes", "distractor_boxes", "is_train", "poses"):
        np.testing.assert_array_equal(getattr(tiny, k), getattr(again, k))
    other = D.generate(D.SyntheticSpec(num_classes=3, train_per_class=4, test_per_class=2, seed=1))
    assert not np.array_equal(tiny.images, other.images)


def test_shapes_and_dtypes(tiny):
    n, M = TINY.num_images, TINY.num_distractors
    assert tiny.images.shape == (n, 64, 64, 3) and tiny.images.dtype == np.uint8
    assert tiny.labels.shape == (n,) and tiny.labels.dtype == np.int64
    assert tiny.part_boxes.shape == (n, 4) and tiny.part_boxes.dtype == np.float32
    assert tiny.object_boxes.shape == (n, 4)
    assert tiny.distractor_boxes.shape == (n, M, 4)
    assert tiny.is_train.dtype == bool and tiny.is_train.sum() == 12
    assert tiny.class_names == ["plus", "cross", "tee"]


def test_box_geometry(bench):
    L = bench.images.shape[1]
    part, dist, obj = bench.part_boxes, bench.distractor_boxes, bench.object_boxes
    frac = (part[:, 2] - part[:, 0]) * (part[:, 3] - part[:, 1]) / L**2
    assert np.all((frac >= 0.01) & (frac <= 0.08))
    assert np.all(_intersection(part[:, None], dist) == 0)  # distractors never overlap the part
    assert np.all(_intersection(dist[:, 0], dist[:, 1]) == 0)
    every = np.concatenate([part[:, None], dist, obj[:, None]], axis=1)
    assert np.all(every[..., :2] >= 0) and np.all(every[..., 2:] <= L)
    assert np.all(obj[:, :2] <= part[:, :2]) and np.all(obj[:, 2:] >= part[:, 2:])  # the part is on the object
    stats = D.benchmark_stats(bench)
    assert stats["train_class_counts"] == [200] * 10 and stats["test_class_counts"] == [50] * 10


def test_benchmark_is_fine_grained(bench):
    """Global linear baselines stay near chance; the same classifier on the part crop succeeds."""
    acc = baseline_accuracies(bench)
    chance = acc["chance"]
    assert chance == 0.1
    assert acc["downsampled_16"] < chance + 0.08, acc
    assert acc["colour_histogram"] < chance + 0.08, acc
    assert acc["part_crop"] > 0.8, acc


def test_pretrain_family_is_disjoint():
    spec = D.SyntheticSpec.pretrain(train_per_class=2, test_per_class=1)
    data = D.generate(spec)
    assert data.num_classes == 32 and len(data) == 96
    assert not set(data.class_names) & set(BENCHMARK_GLYPHS)
    bench_small = D.generate(D.SyntheticSpec(train_per_class=2, test_per_class=1))
    assert not np.array_equal(data.images[:30], bench_small.images[:30])  # its own random stream


def test_cache_round_trip(tmp_path, tiny, monkeypatch):
    first = D.load_or_generate(TINY, tmp_path)
    path = cache_path(TINY, tmp_path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    mtime = path.stat().st_mtime_ns
    second = D.load_or_generate(TINY, tmp_path)
    assert path.stat().st_mtime_ns == mtime  # loaded, not regenerated
    for k in ("images", "labels", "part_boxes", "distractor_boxes", "is_train", "poses", "distractor_labels"):
        np.testing.assert_array_equal(getattr(first, k), getattr(second, k))
        np.testing.assert_array_equal(getattr(first, k), getattr(tiny, k))
    assert second.class_names == tiny.class_names and second.spec == TINY
    monkeypatch.setenv("DCAL_DATA_CACHE", str(tmp_path / "env"))
    D.load_or_generate(TINY)
    assert cache_path(TINY, tmp_path / "env").exists()


def test_corrupt_cache_is_an_error(tmp_path):
    path = cache_path(TINY, tmp_path)
    path.write_bytes(b"not a zip file")
    with pytest.raises(D.DatasetError, match=path.name):
        D.load_or_generate(TINY, tmp_path)


# ------------------------------------------------------------------------------------------- datasets, transforms


def test_synthetic_dataset_and_collate(bench):
    tf = D.build_transforms(True, resize_size=72, crop_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    ds = D.SyntheticFGVC(bench, "train", transform=tf)
    assert len(ds) == 2000 and len(D.SyntheticFGVC(bench, "test")) == 500
    batch = next(iter(DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["part_box"].shape == (8, 4) and batch["distractor_boxes"].shape == (8, 2, 4)
    assert batch["label"].tolist() == ds.labels[:8].tolist() and batch["index"].tolist() == list(range(8))


def test_test_transform_maps_boxes_exactly():
    img = np.zeros((64, 64, 3), np.uint8)
    boxes = torch.tensor([[8.0, 16.0, 22.0, 30.0], [float("nan")] * 4])
    out, b = D.build_transforms(False, 72, 64, mean=(0, 0, 0), std=(1, 1, 1))(img, boxes)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(b[0], torch.tensor([8.0, 16.0, 22.0, 30.0]) * 72 / 64 - 4)
    assert torch.isnan(b[1]).all()  # unknown stays unknown


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_moves_boxes_with_pixels(seed):
    """A white square, resized/cropped/flipped at random: the mapped box still frames it."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:30, 36:50] = 255  # box x0=36 y0=10 x1=50 y1=30
    torch.manual_seed(seed)
    tf = build_transforms(True, 80, 64, mean=(0, 0, 0), std=(1, 1, 1))
    out, b = tf(img, torch.tensor([[36.0, 10.0, 50.0, 30.0]]))
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (found - b[0]).abs().max() <= 1.0, (found, b)


def test_transform_is_reproducible_from_torch_seed():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tf = D.build_transforms(True, 80, 64)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append([tf(img, torch.zeros(1, 4))[0] for _ in range(3)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_train_transform_flips_and_crops_boxes_like_the_pixels_over_many_draws():
    """Both flip outcomes and many crop offsets occur; the part box and a NaN (unknown) box stay consistent."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[8:24, 40:56] = 255  # x0=40 y0=8 x1=56 y1=24
    tf = build_transforms(True, 72, 64, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    lefts = set()
    for _ in range(40):
        out, b = tf(img, torch.tensor([[40.0, 8.0, 56.0, 24.0], [float("nan")] * 4]))
        ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (found - b[0]).abs().max() <= 1.0, (found, b)
        assert torch.isnan(b[1]).all()
        lefts.add(round(float(b[0, 0])))
    assert min(lefts) < 32 < max(lefts)  # the box was mirrored to the left half in some draws


def test_default_transform_is_a_float_tensor_and_leaves_boxes_alone():
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, b = default_transform()(img, boxes)
    torch.testing.assert_close(out, torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    assert isinstance(b, torch.Tensor) and type(b) is torch.Tensor and torch.equal(b, boxes)
    assert isinstance(build_transforms(False, 32, 28), BoxAware)


def test_crop_larger_than_resize_is_an_error():
    with pytest.raises(ValueError, match="crop_size"):
        D.build_transforms(True, 64, 72)
    with pytest.raises(ValueError, match="expected an \\(H, W, 3\\) image array"):
        build_transforms(False, 64, 64)(np.zeros((64, 64), np.uint8), torch.zeros(0, 4))


# ------------------------------------------------------------------------------------------- CUB layout


@pytest.fixture()
def cub_root(tmp_path, tiny) -> Path:
    return D.write_cub(tiny, tmp_path / "cub")


def test_cub_round_trip(cub_root, tiny):
    for split in ("train", "test"):
        cub, syn = D.CUB200(cub_root, split), D.SyntheticFGVC(tiny, split)
        assert len(cub) == len(syn) and cub.num_classes == 3
        assert [n.lower() for n in cub.class_names] == tiny.class_names
        np.testing.assert_array_equal(cub.labels, syn.labels)
        idx = syn.indices
        np.testing.assert_allclose(cub.report.part_boxes, tiny.part_boxes[idx], atol=1.0)
        np.testing.assert_allclose(cub.report.distractor_boxes, tiny.distractor_boxes[idx], atol=1.0)
        np.testing.assert_allclose(cub.report.object_boxes, tiny.object_boxes[idx], atol=1.0)
        for i in range(len(cub)):
            a, b = cub[i], syn[i]
            assert a["label"] == b["label"] and a["index"] == b["index"] == i
            torch.testing.assert_close(a["part_box"], b["part_box"], atol=1.0, rtol=0)
            assert (a["image"] - b["image"]).abs().mean() < 6 / 255  # JPEG q95 of a noisy image


def test_cub_without_mark_parts_has_unknown_boxes(cub_root):
    """The real CUB: 15 bird keypoints (no box parts) -> part boxes NaN, no distractors."""
    names = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]
    (cub_root / "parts" / "parts.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    (cub_root / "parts" / "part_locs.txt").write_text("1 1 10.0 12.0 1\n")
    s = D.CUB200(cub_root, "train")[0]
    assert torch.isnan(s["part_box"]).all() and s["distractor_boxes"].shape == (0, 4)
    for p in (cub_root / "parts").iterdir():
        p.unlink()
    (cub_root / "parts").rmdir()
    assert D.CUB200(cub_root, "test")[0]["distractor_boxes"].shape == (0, 4)


def _edit_line(path: Path, lineno: int, new: str | None) -> None:
    """Replace (or delete, new=None) a 1-based line of a text file."""
    lines = path.read_text().splitlines()
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def _image_path(root: Path, image_id: int) -> Path:
    line = (root / "images.txt").read_text().splitlines()[image_id - 1]
    return root / "images" / line.split()[1]


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda r: (r / "classes.txt").unlink(), r"classes\.txt: required file is missing"),
        (lambda r: _image_path(r, 3).unlink(), r"images\.txt line 3: image id 3 file '.*' does not exist"),
        (lambda r: _image_path(r, 3).write_bytes(b"garbage"), r"images\.txt line 3: .* cannot be read"),
        (lambda r: _image_path(r, 4).write_bytes(_image_path(r, 4).read_bytes()[:300]),
         r"images\.txt line 4: .* cannot be read"),
        (lambda r: _edit_line(r / "image_class_labels.txt", 2, "2 9"),
         r"image_class_labels\.txt line 2: image id 2 has class id 9, which is not in classes\.txt"),
        (lambda r: _edit_line(r / "train_test_split.txt", 5, "5 2"),
         r"train_test_split\.txt line 5: image id 5 has split value '2', expected 0 or 1"),
        (lambda r: _edit_line(r / "train_test_split.txt", 5, "4 1"),
         r"train_test_split\.txt line 5: duplicate image id 4"),
        (lambda r: _edit_line(r / "train_test_split.txt", 5, None), r"train_test_split\.txt: image id 5 .* no entry"),
        (lambda r: _edit_line(r / "train_test_split.txt", 5, "99 1"),
         r"train_test_split\.txt line 5: image id 99 is not in images\.txt"),
        (lambda r: _edit_line(r / "images.txt", 2, "2"), r"images\.txt line 2: expected 2 fields"),
        (lambda r: _edit_line(r / "bounding_boxes.txt", 3, "3 1 2 -5 4"), r"bounding_boxes\.txt line 3: .*negative"),
        (lambda r: (r / "parts" / "part_locs.txt").unlink(), r"parts/part_locs\.txt: required file is missing"),
    ],
    ids=["missing-file", "missing-image", "corrupt-image", "truncated-image", "label-out-of-range",
         "split-value", "split-duplicate", "split-missing", "split-unknown-id", "malformed-line",
         "negative-box", "missing-part-locs"],
)
def test_validation_names_file_and_line(cub_root, corrupt, pattern):
    corrupt(cub_root)
    with pytest.raises(D.DatasetError, match=pattern) as err:
        D.validate_cub(cub_root)
    assert isinstance(err.value, ValueError)
    raised = []  # the dataset constructors validate too (image checks only cover their own split)
    for split in ("train", "test"):
        try:
            D.CUB200(cub_root, split)
        except D.DatasetError as e:
            raised.append(str(e))
    assert raised and all(re.search(pattern, m) for m in raised), raised


def test_skip_bad_images_lists_every_file(cub_root, tiny, caplog):
    train_ids = [i + 1 for i in np.flatnonzero(tiny.is_train)]
    missing, corrupt = _image_path(cub_root, train_ids[0]), _image_path(cub_root, train_ids[1])
    missing.unlink()
    corrupt.write_bytes(b"garbage")
    logger = logging.getLogger("test.dcal.skip")
    with caplog.at_level(logging.WARNING, logger="test.dcal.skip"):
        ds = D.CUB200(cub_root, "train", skip_bad_images=True, logger=logger)
    assert len(ds) == len(train_ids) - 2
    assert sorted(p for p, _ in ds.skipped) == sorted(
        f"images/{p.relative_to(cub_root / 'images')}" for p in (missing, corrupt))
    for p in (missing, corrupt):
        assert p.name in caplog.text
    assert train_ids[0] not in ds.image_ids.tolist() and len(ds[0]["image"]) == 3


# ------------------------------------------------------------------------------------------- image folders


def _make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("b_class", "a_class"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
            (d / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path):
    _make_folder(tmp_path)
    train, test = D.ImageFolderFGVC(tmp_path, "train"), D.ImageFolderFGVC(tmp_path, "test")  # test -> val
    assert train.class_names == test.class_names == ["a_class", "b_class"]
    assert len(train) == 6 and len(test) == 4 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    tf = D.build_transforms(False, 32, 28)
    batch = next(iter(DataLoader(D.ImageFolderFGVC(tmp_path, "train", transform=tf), batch_size=4)))
    assert batch["image"].shape == (4, 3, 28, 28) and batch["distractor_boxes"].shape == (4, 0, 4)
    assert torch.isnan(batch["part_box"]).all()


def test_image_folder_bad_image(tmp_path, caplog):
    _make_folder(tmp_path)
    bad = tmp_path / "train" / "a_class" / "1.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(D.DatasetError, match=os.path.basename(bad)):
        D.ImageFolderFGVC(tmp_path, "train")
    with caplog.at_level(logging.WARNING, logger="dcal.data"):
        ds = D.ImageFolderFGVC(tmp_path, "train", skip_bad_images=True)
    assert len(ds) == 5 and ds.skipped[0][0] == str(bad) and str(bad) in caplog.text
    with pytest.raises(D.DatasetError, match="split folder is missing"):
        D.ImageFolderFGVC(tmp_path / "train", "train")
