"""The synthetic shapes shards: deterministic, img2dataset layout, readable by webdataset."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ldmscale.data import synthetic


def _digest(paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_roundtrip_through_webdataset(tmp_path):
    paths = synthetic.write_shards(tmp_path, num_samples=25, resolution=32, shard_size=10, seed=3, progress=False)
    assert [p.name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # webdataset must not warn (shardshuffle etc.)
        dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).decode("rgb8")
        samples = list(dataset)
    assert len(samples) == 25
    for sample in samples:
        meta = sample["json"]
        image = sample["png"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert sample["txt"] == meta["caption"] == f"a {meta['colour']} {meta['shape']} in the {meta['position']}"
        assert int(sample["cls"]) == meta["class_id"] == synthetic.class_id(meta["shape"], meta["colour"])
        x0, y0, x1, y1 = meta["bbox"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # The shape's colour really is in the box and the corners are background.
        cx, cy = int((x0 + x1) / 2 * 32), int((y0 + y1) / 2 * 32 + 2)
        assert np.abs(image[cy, cx].astype(int) - synthetic.COLOURS[meta["colour"]]).max() < 40
        assert image[0, 0].std() == 0 or "top left" not in meta["position"]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = synthetic.write_shards(tmp_path / "a", 30, 32, 15, seed=1, progress=False)
    b = synthetic.write_shards(tmp_path / "b", 30, 32, 15, seed=1, progress=False)
    c = synthetic.write_shards(tmp_path / "c", 30, 32, 15, seed=2, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_sample_independent_of_shard_size():
    one = synthetic.make_sample(5, 17, 32)
    assert one == synthetic.make_sample(5, 17, 32)


def test_covers_every_shape_colour_position():
    specs = [synthetic.draw_spec(0, i) for i in range(400)]
    assert {s.shape for s in specs} == set(synthetic.SHAPES)
    assert {s.colour for s in specs} == set(synthetic.COLOURS)
    assert {s.position for s in specs} == set(synthetic.POSITIONS)
    assert len(synthetic.COLOURS) >= 6 and len(synthetic.SHAPES) >= 3


def test_holdout_is_never_drawn():
    held = synthetic.parse_holdout(["blue triangle"])
    specs = [synthetic.draw_spec(0, i, held) for i in range(500)]
    assert not any(s.colour == "blue" and s.shape == "triangle" for s in specs)
    with pytest.raises(ValueError, match="holdout"):
        synthetic.parse_holdout(["teal hexagon"])


def test_cli(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "make_synthetic_shards.py"), "--out", str(tmp_path),
                          "--num-samples", "40", "--resolution", "16", "--shard-size", "20"],
                         capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "samples/s" in out.stdout
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shapes-000000.tar", "shapes-000001.tar"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyse_reads_back_rendered_ground_truth(resolution):
    specs = [synthetic.draw_spec(11, i) for i in range(300)]
    results = [synthetic.analyse(np.asarray(synthetic.render(s, resolution))) for s in specs]
    for key in ("shape", "colour", "position"):
        accuracy = np.mean([getattr(r, key) == getattr(s, key) for r, s in zip(results, specs)])
        assert accuracy >= 0.99, (key, accuracy)
    assert all(r.num_components == 1 for r in results)
    assert min(synthetic.box_iou(r.bbox, s.bbox) for r, s in zip(results, specs)) > 0.6


def test_analyse_blank_and_two_shapes():
    blank = np.full((32, 32, 3), 220, np.uint8)
    assert synthetic.analyse(blank).shape is None and synthetic.analyse(blank).num_components == 0
    two = blank.copy()
    two[2:8, 2:8] = synthetic.COLOURS["red"]
    two[20:28, 20:28] = synthetic.COLOURS["blue"]
    assert synthetic.analyse(two).num_components == 2
    assert synthetic.box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)


def test_score_adherence_on_ground_truth_and_on_noise():
    asked = synthetic.eval_prompts()
    assert len(asked) == 72 >= 64
    truth = []
    for i, (colour, shape, position) in enumerate(asked):
        spec = synthetic.draw_spec(0, i)
        spec = synthetic.ShapeSpec(shape, colour, position,
                                   _move_box(spec.bbox, position), spec.background)
        truth.append(np.asarray(synthetic.render(spec, 32)))
    perfect = synthetic.score_adherence(truth, asked, holdout=["blue triangle"])
    assert perfect["colour"] == perfect["shape"] == perfect["position"] == 1.0
    assert perfect["num_held_out_images"] == 4 and perfect["held_out"]["colour"] == 1.0
    noise = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(72)]
    bad = synthetic.score_adherence(noise, asked)
    assert bad["all_three"] < 0.2


def _move_box(bbox, position):
    size = bbox[2] - bbox[0]
    cx = 0.25 if "left" in position else 0.75
    cy = 0.25 if "top" in position else 0.75
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
