"""Periodic sample grids: the EMA weights through ldmscale.inference.generate, one PNG per call."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldmscale.config import compose
from ldmscale.inference import SampleInputs, SamplingSettings, generate
from ldmscale.models import build_denoiser
from ldmscale.runs import Run
from ldmscale.trainer import SampleGrid
from tests._train_helpers import ema_that_differs


def test_sample_grid_is_generate_on_the_ema_weights(tmp_path):
    cfg = compose(["trainer.sample_steps=3", "trainer.sample_prompts=[a red circle,a blue square]"])
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg.model, cfg.conditioner)
    ema = ema_that_differs(denoiser)

    grid = SampleGrid(cfg)
    [(path, caption)] = grid(ema, 7, tmp_path)
    assert path == tmp_path / "step_00000007.png" and caption == "a red circle | a blue square"
    image = np.asarray(Image.open(path))
    assert image.shape == (32, 64, 3)

    # the same images straight from generate() with the EMA weights loaded
    reference = build_denoiser(cfg.model, cfg.conditioner)
    reference.load_state_dict(ema.full_state_dict(), strict=False)
    models = grid._models
    expected = generate(Run(cfg, reference, models.autoencoder, models.text_encoder),
                        SampleInputs(prompts=list(cfg.trainer.sample_prompts)),
                        SamplingSettings(seed=cfg.trainer.sample_seed, height=32, width=32, num_steps=3,
                                         progress=False)).images
    row = (torch.cat(list(expected), dim=2).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(image, row)
    grid(ema, 8, tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "step_00000008.png")), image)  # fixed seeds
