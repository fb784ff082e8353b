"""FID and CLIP score: pytorch-fid's network and Fréchet distance reproduced, statistics files, rank splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ldmscale.config import ConfigError, EvalConfig, compose
from ldmscale.evaluation import FeatureStats, InceptionFeatures, frechet_distance, load_stats, save_stats
from ldmscale.evaluation.clip_score import TINY_CLIP_MODEL, CLIPScorer
from ldmscale.evaluation.fid import FID_WEIGHTS_FILE, resolve_inception_weights
from ldmscale.evaluation.generated import SampleEvaluator


def _images(indices, size: int = 32) -> torch.Tensor:
    """Deterministic smooth test images in [-1, 1], one per global index (the same on any rank)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(1000 + i)
        coarse = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
        out.append(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0])
    return torch.stack(out)


def test_frechet_distance_equals_pytorch_fid_on_the_same_statistics():
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=g, dtype=torch.float64) / 8
    a = torch.randn(2000, 128, generator=g, dtype=torch.float64) @ mix
    b = torch.randn(2000, 128, generator=g, dtype=torch.float64) @ (mix + 0.02) + 0.1
    for x, y in ((a, b), (a, a[:1000] * 1.1)):
        mu1, mu2 = x.mean(0).numpy(), y.mean(0).numpy()
        s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
        expected = calculate_frechet_distance(mu1, s1, mu2, s2)
        got = frechet_distance(*map(torch.from_numpy, (mu1, s1, mu2, s2)))
        assert got == pytest.approx(expected, rel=1e-6)


def test_inception_features_equal_pytorch_fids_forward_on_the_same_weights(fid_inception_weights, tmp_path,
                                                                           monkeypatch):
    from pytorch_fid.inception import InceptionV3

    # pytorch-fid finds the file in its own cache location (torch hub's checkpoints folder): nothing downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(fid_inception_weights.read_bytes())
    assert resolve_inception_weights(None) == cached
    reference = InceptionV3([3]).eval()  # the package's own constructor and loader
    ours = InceptionFeatures(resolve_inception_weights(None))
    levels = torch.randint(0, 256, (3, 3, 40, 24)).float()  # 8-bit images, as pytorch-fid reads PNGs; non-square
    pixels = levels / 127.5 - 1
    with torch.no_grad():
        expected = reference(levels / 255)[0].flatten(1).double()
    got = ours(pixels)
    assert got.shape == (3, 2048) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.std(0).mean() > 1e-3  # the random network does not collapse every image to one point
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(fid_inception_weights):
    net = InceptionFeatures(fid_inception_weights)
    images = _images(range(12))
    shifts = (0.1, 0.3, 0.6)
    features = net(torch.cat([images, *[(images + s).clamp(-1, 1) for s in shifts]])).split(len(images))
    reference = FeatureStats()
    reference.update(features[0])
    fids = []
    for feats in features:
        stats = FeatureStats()
        stats.update(feats)
        fids.append(frechet_distance(*stats.mean_cov(), *reference.mean_cov()))
    scale = reference.mean_cov()[1].trace().item()
    assert abs(fids[0]) < 1e-5 * scale  # rounding in the near-null directions of a 12-image covariance
    assert fids[0] < fids[1] < fids[2] < fids[3] and fids[1] > 1e-4 * scale


def test_statistics_files_are_pytorch_fids_npz(tmp_path):
    from pytorch_fid.fid_score import compute_statistics_of_path

    features = torch.randn(30, 8, dtype=torch.float64)
    stats = FeatureStats(dim=8)
    stats.update(features)
    path = save_stats(tmp_path / "ref.npz", *stats.mean_cov(), num_images=30)
    mu, sigma = compute_statistics_of_path(str(path), None, 1, 8, "cpu")  # pytorch-fid reads it as is
    np.testing.assert_allclose(mu, features.mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(features.numpy(), rowvar=False))
    torch.testing.assert_close(load_stats(path), (torch.from_numpy(mu), torch.from_numpy(sigma)))
    with pytest.raises(FileNotFoundError, match="eval.reference_stats"):
        load_stats(tmp_path / "none.npz")


def test_clip_score_is_100_times_the_cosine_of_open_clips_embeddings(tmp_path):
    import open_clip
    from PIL import Image

    scorer = CLIPScorer(TINY_CLIP_MODEL)
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).float() / 127.5 - 1  # the model's size: no resize
    prompts = ["a red circle", "a blue square in the top left"]
    model = scorer.model
    transform = open_clip.image_transform(32, is_train=False)  # open_clip's own eval preprocessing (PIL)
    pil = [Image.fromarray(((p + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for p in pixels]
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(torch.stack([transform(p) for p in pil])), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(prompts)), dim=-1)
    expected = (100 * (image * text).sum(-1)).clamp_min(0).double()
    torch.testing.assert_close(scorer(pixels, prompts), expected, rtol=1e-4, atol=1e-4)
    # local weights load into the named architecture; a real model without weights names the key
    torch.save({k: v * 0.5 for k, v in model.state_dict().items()}, tmp_path / "clip.pt")
    halved = CLIPScorer(TINY_CLIP_MODEL, tmp_path / "clip.pt")
    torch.testing.assert_close(halved.model.visual.conv1.weight, model.visual.conv1.weight * 0.5)
    with pytest.raises(ValueError, match="eval.clip_weights"):
        CLIPScorer("ViT-B-32")


def _rank_worker(rank: int, world: int, init_file: str, cfg: EvalConfig, prompts: list[str], out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = SampleEvaluator(cfg).evaluate(_images, 6, prompts=prompts, batch_size=2)
        if rank == 0:
            torch.save({"fid": result["fid"], "clip_score": result["clip_score"]}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch and build the networks (~20 s)
def test_two_ranks_give_the_single_rank_numbers(fid_inception_weights, tmp_path):
    net = InceptionFeatures(fid_inception_weights)
    reference = FeatureStats()
    reference.update(net(_images(range(100, 108))))
    cfg = EvalConfig(inception_weights=str(fid_inception_weights), clip_model=TINY_CLIP_MODEL,
                     reference_stats=str(save_stats(tmp_path / "ref.npz", *reference.mean_cov(), 8)))
    prompts = [f"prompt {i}" for i in range(6)]
    single = SampleEvaluator(cfg).evaluate(_images, 6, prompts=prompts, batch_size=4)
    assert single["fid"] > 0 and 0 <= single["clip_score"] <= 100 and single["stats"].count == 6
    out = tmp_path / "two.pt"
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), cfg, prompts, str(out)), nprocs=2,
                       start_method="spawn")
    two = torch.load(out)
    assert two["fid"] == pytest.approx(single["fid"], rel=1e-6)  # float32 batches differ
    assert two["clip_score"] == pytest.approx(single["clip_score"], rel=1e-6)


def test_in_loop_evaluation_that_measures_nothing_fails_at_start():
    with pytest.raises(ConfigError, match="eval.reference_stats"):
        compose(["eval.every_steps=100"])
    with pytest.raises(ConfigError, match="conditioner.kind='sr'"):
        compose(["+experiment=demo_sr4", "eval.every_steps=100", "eval.clip_model=ldmscale-tiny-clip"])
