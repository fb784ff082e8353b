"""tools/fid_stats.py, tools/evaluate.py and the in-loop evaluation, on tiny random networks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmscale.config import compose, save_resolved
from ldmscale.data.pixels import PixelShardDataset
from ldmscale.data.synthetic import write_shards
from ldmscale.evaluation import FeatureStats, InceptionFeatures, frechet_distance, load_stats
from ldmscale.evaluation.clip_score import TINY_CLIP_MODEL, CLIPScorer
from ldmscale.evaluation.generated import LoopEvaluation
from ldmscale.inference import SampleInputs, SamplingSettings, generate
from ldmscale.models import build_denoiser
from ldmscale.runs import Run
from tests._train_helpers import ema_that_differs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate as evaluate_tool  # noqa: E402
import fid_stats  # noqa: E402

PROMPTS = ["a red circle in the top left", "a blue square in the bottom right", "a green triangle"]


def _unzero(module):
    """LDM zero-initialises output layers; a fresh U-Net's exactly-zero output makes guidance rescale 0/0."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.normal_(0, 0.05)


def _config(tmp_path, weights, *extra):
    return compose(["data.resolution=16", "diffusion.num_sampling_steps=2", f"eval.inception_weights={weights}",
                    f"eval.clip_model={TINY_CLIP_MODEL}", f"eval.prompts=[{','.join(PROMPTS)}]",
                    "eval.num_images=4", "eval.batch_size=3", "eval.seed=5", f"run_dir={tmp_path / 'run'}", *extra])


def _direct_scores(cfg, denoiser, models, reference, inception):
    """FID/CLIP of images 0..N-1 made straight by generate(): seed eval.seed + i, prompt i mod P."""
    n = cfg.eval.num_images
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    images = generate(Run(cfg, denoiser, models.autoencoder, models.text_encoder), SampleInputs(prompts=prompts),
                      SamplingSettings(seeds=[cfg.eval.seed + i for i in range(n)], progress=False)).images * 2 - 1
    stats = FeatureStats()
    stats.update(inception(images))
    clip = CLIPScorer(TINY_CLIP_MODEL)(images, prompts).mean().item()
    return frechet_distance(*stats.mean_cov(), *reference), clip


@pytest.mark.slow  # ~20 s idle: shards, Inception passes, a run dir through the tool
def test_fid_stats_then_evaluate_a_run_dir(tmp_path, fid_inception_weights):
    shards = write_shards(tmp_path / "shards", 10, 16, 4, seed=0)
    out = fid_stats.main([str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "ref.npz"),
                          "--resolution", "16", "--inception-weights", str(fid_inception_weights),
                          "--batch-size", "4"])
    inception = InceptionFeatures(fid_inception_weights)
    dataset = PixelShardDataset([str(tmp_path / "shards" / "*.tar")], 16)
    direct = FeatureStats()
    direct.update(inception(torch.stack([dataset[i] for i in range(len(dataset))])))
    mu, sigma = load_stats(out)
    assert len(dataset) == 10 and shards
    torch.testing.assert_close((mu, sigma), direct.mean_cov(), rtol=1e-6, atol=1e-6)

    cfg = _config(tmp_path, fid_inception_weights, f"eval.reference_stats={out}")
    run_dir = Path(cfg.run_dir)
    save_resolved(cfg, run_dir)
    torch.manual_seed(1)
    denoiser = build_denoiser(cfg.model, cfg.conditioner).eval()
    _unzero(denoiser)
    (run_dir / "export").mkdir()
    save_file(denoiser.state_dict(), str(run_dir / "export" / "denoiser_ema.safetensors"))
    with pytest.warns(UserWarning, match="autoencoder.weights"):
        result = evaluate_tool.main([str(run_dir), "--num-images", "4"])
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["fid"] == result["fid"] > 0 and 0 <= saved["clip_score"] <= 100 and saved["num_images"] == 4
    assert load_stats(run_dir / "evaluation.npz")[0].shape == (2048,)

    from ldmscale.runs import load

    with pytest.warns(UserWarning):
        models = load(run_dir)
    fid, clip = _direct_scores(cfg, models.denoiser, models, (mu, sigma), inception)
    # 4 images against 2,048 features: singular covariances amplify float32 differences between batchings
    # of the same images (~2e-5 seen); wrong images or seeds move the FID by far more.
    assert result["fid"] == pytest.approx(fid, rel=1e-4) and result["clip_score"] == pytest.approx(clip, rel=1e-5)


@pytest.mark.slow
def test_loop_evaluation_scores_the_ema_weights(tmp_path, fid_inception_weights):
    inception = InceptionFeatures(fid_inception_weights)
    dataset = PixelShardDataset([str(p) for p in write_shards(tmp_path / "shards", 6, 16, 6, seed=0)], 16)
    reference = FeatureStats()
    reference.update(inception(torch.stack([dataset[i] for i in range(len(dataset))])))
    from ldmscale.evaluation import save_stats

    ref_path = save_stats(tmp_path / "ref.npz", *reference.mean_cov(), 6)
    cfg = _config(tmp_path, fid_inception_weights, f"eval.reference_stats={ref_path}", "eval.every_steps=1")
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg.model, cfg.conditioner)
    _unzero(denoiser)
    ema = ema_that_differs(denoiser)
    loop = LoopEvaluation(cfg)
    metrics = loop(ema, 1)
    assert set(metrics) == {"eval/fid", "eval/clip_score"}
    ema_denoiser = build_denoiser(cfg.model, cfg.conditioner).eval()
    ema_denoiser.load_state_dict(ema.full_state_dict(), strict=False)
    fid, clip = _direct_scores(cfg, ema_denoiser, loop._models, reference.mean_cov(), inception)
    assert metrics["eval/fid"] == pytest.approx(fid, rel=1e-5)
    assert metrics["eval/clip_score"] == pytest.approx(clip, rel=1e-5)


@pytest.mark.slow  # ~30 s idle: 72 samples and ~90 Inception passes
def test_demo_evaluation_reports_fid_and_clip_score(tmp_path, fid_inception_weights):
    from ldmscale.pipeline import Pipeline

    root = tmp_path / "demo"
    cfg = _config(tmp_path, fid_inception_weights, "pipeline.eval_seeds_per_prompt=1", f"run_dir={root}",
                  "eval.prompts=[]")
    write_shards(root / "data" / "val", 8, 16, 8, seed=0, start_index=10**8)
    save_resolved(cfg, root / "unet")
    torch.manual_seed(1)
    denoiser = build_denoiser(cfg.model, cfg.conditioner).eval()
    _unzero(denoiser)
    (root / "unet" / "export").mkdir()
    save_file(denoiser.state_dict(), str(root / "unet" / "export" / "denoiser_ema.safetensors"))
    with pytest.warns(UserWarning, match="autoencoder.weights"):
        scores = Pipeline(cfg, []).evaluate()
    assert scores["num_images"] == 72 and scores["fid"] > 0 and 0 <= scores["clip_score"] <= 100
    assert json.loads((root / "eval.json").read_text())["fid"] == scores["fid"]
    assert load_stats(root / "fid_reference.npz")[0].shape == (2048,)  # the held-out images' statistics


@pytest.mark.slow  # a 2-rank DeepSpeed run (~1-2 min)
def test_two_rank_training_logs_fid_and_clip_every_eval_steps(tmp_path, fid_inception_weights):
    import subprocess

    from ldmscale.evaluation import save_stats
    from tests._train_helpers import make_cached_shards
    from tests.test_training_dist import ROOT, dist_env

    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, 2048, generator=g, dtype=torch.float64)
    stats = FeatureStats()
    stats.update(features)
    reference = save_stats(tmp_path / "ref.npz", *stats.mean_cov(), 64)
    cache = make_cached_shards(tmp_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741",
           "-m", "ldmscale.train", "stage=diffusion", f"data.train_shards=[{cache}]", "data.micro_batch_size=8",
           "data.global_batch_size=16", "trainer.max_steps=4", "trainer.log_every_steps=2",
           "checkpoint.every_steps=4", "deepspeed.zero_stage=2", f"run_dir={run_dir}", "logger.wandb_mode=offline",
           "logger.progress_bar=false", "eval.every_steps=2", "eval.num_images=3", "eval.num_steps=2",
           f"eval.inception_weights={fid_inception_weights}", f"eval.clip_model={TINY_CLIP_MODEL}",
           f"eval.reference_stats={reference}"]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval/fid"] > 0 and 0 <= r["eval/clip_score"] <= 100 for r in evals)
    assert evals[0]["eval/fid"] != evals[1]["eval/fid"]  # the EMA weights moved between evaluations
