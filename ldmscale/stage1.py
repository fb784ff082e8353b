"""Stage 1: the autoencoder Task (KL or VQ) trained with L1/L2 + LPIPS + KL/codebook + PatchGAN.

Two DeepSpeed engines, "generator" (autoencoder + the NLL log-variance) and "discriminator", not one
engine with two parameter groups. A GAN alternates two losses over disjoint parameter sets: with one
engine, a backward of the generator loss would also write gradients (and, under ZeRO-2, reduce-scatter
them) into the discriminator's partitions, and one `step()` would update both with the wrong gradients.
Two engines give each player its own optimiser, ZeRO partitioning, gradient clipping, lr schedule and
checkpoint folder, with no hand-made masking. During the generator step the discriminator's parameters
are frozen (requires_grad=False), so no gradient reaches its engine's hooks.

The frozen LPIPS network is held outside both engines: it is not trained and not checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch import nn

from ldmscale import evaluation
from ldmscale.config import Config
from ldmscale.data.pixels import PixelShardDataset, build_pixel_loader
from ldmscale.latent_scale import SCALE_FILE as LATENT_SCALE_FILE  # RUN_DIR/latent_scale.json
from ldmscale.latent_scale import STAGE1_EXPORT
from ldmscale.models import build_autoencoder
from ldmscale.models.autoencoder import AutoencoderKL, VQModel
from ldmscale.models.losses import (
    AutoencoderLoss,
    adaptive_weight_from_grads,
    build_discriminator,
    conv_weight_grad,
)

EXPORT_DIR = STAGE1_EXPORT  # RUN_DIR/autoencoder: our export (weights + config with the latent scale)
DIFFUSERS_DIR = "autoencoder_diffusers"  # RUN_DIR/autoencoder_diffusers: a diffusers AutoencoderKL folder


class GeneratorModule(nn.Module):
    """What the generator engine trains: the autoencoder and LDM's learned NLL log-variance."""

    def __init__(self, autoencoder: AutoencoderKL | VQModel, loss: AutoencoderLoss) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.loss = loss  # registers only `logvar`; LPIPS is kept unregistered (frozen, not saved)

    def forward(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """pixels → (reconstruction, KL [B] | VQ loss [], VQ code indices [B,h,w] | None)."""
        if isinstance(self.autoencoder, VQModel):
            out = self.autoencoder(pixels)
            return out.reconstruction, out.qloss, out.indices
        recon, posterior = self.autoencoder(pixels, sample_posterior=True, generator=generator)
        return recon, posterior.kl(), None


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place; a CPU tensor goes through the GPU under NCCL (which reduces only CUDA tensors)."""
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl" and t.device.type != "cuda":
            moved = t.cuda()
            tdist.all_reduce(moved)
            t.copy_(moved.cpu())
        else:
            tdist.all_reduce(t)
    return t


class AutoencoderTask:
    """Stage-1 training for the shared trainer: `train_step`, `evaluate`, `state_dict`, `export`."""

    name = "autoencoder"

    def __init__(self, cfg: Config, *, rank: int | None = None, world_size: int | None = None) -> None:
        from ldmscale.distributed import engine as ds_engine

        self.cfg = cfg
        r, w = _rank_world()
        self.rank, self.world_size = (r if rank is None else rank), (w if world_size is None else world_size)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        autoencoder = build_autoencoder(cfg.autoencoder)
        self.loss_fn = AutoencoderLoss(cfg.ae_loss, kind=cfg.autoencoder.kind)
        generator = GeneratorModule(autoencoder, self.loss_fn)
        discriminator = build_discriminator(cfg.ae_loss)
        common = dict(micro_batch_size=cfg.data.micro_batch_size, global_batch_size=cfg.data.global_batch_size,
                      world_size=self.world_size, max_steps=cfg.trainer.max_steps)
        self.g_engine = ds_engine.initialize(generator, cfg.deepspeed, cfg.optim, **common)
        d_optim = dataclasses.replace(cfg.optim, lr=cfg.ae_loss.disc_lr or cfg.optim.lr)
        self.d_engine = ds_engine.initialize(discriminator, cfg.deepspeed, d_optim, **common)
        self.device = self.g_engine.device
        if self.loss_fn.perceptual is not None:
            self.loss_fn.perceptual.to(self.device)
        self.micro_steps = 0
        self.logger: Any = None  # the run's metrics sink, for evaluation results (set by the runner)
        self._inception_net: Optional[evaluation.InceptionFeatures] = None  # built on first rFID evaluation
        # The decoder's last-layer input, for the adaptive weight (see train_step).
        self._conv_out_input = torch.empty(0)
        self.autoencoder.decoder.conv_out.register_forward_hook(self._capture_conv_out_input)

    def _capture_conv_out_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        self._conv_out_input = inputs[0].detach()

    # ------------------------------------------------------------------ trainer protocol
    def engines(self) -> dict[str, Any]:
        return {"generator": self.g_engine, "discriminator": self.d_engine}

    @property
    def autoencoder(self) -> AutoencoderKL | VQModel:
        return self.g_engine.module.autoencoder

    @property
    def step(self) -> int:
        """Optimizer steps taken (the discriminator switches on at ae_loss.disc_start of these)."""
        return self.g_engine.global_steps

    def _posterior_generator(self) -> torch.Generator:
        # KL sampling noise is a function of (seed, micro step, rank): exact resume without RNG state.
        seed = (self.cfg.seed * 1_000_003 + self.micro_steps) * 4099 + self.rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step of both players over the micro-batches; logs are means over them, left on the
        device (no host sync: the trainer reads them at logged steps).

        A non-finite generator loss on any rank poisons both players' gradients, so the overflow check at
        the accumulation boundary drops both optimiser steps on every rank (Engine.backward's rule, as in
        stage 2); "skipped" is the generator engine's device-side flag.
        """
        sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            for key, value in self.micro_step(batch, step).items():
                sums[key] = sums.get(key, 0) + value.detach().float()
        out = {k: v / len(micro_batches) for k, v in sums.items()}
        out["skipped"] = self.g_engine.skipped
        return out

    def micro_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One micro-batch: generator backward/step, then (once on) the discriminator's.

        The generator loss is evaluated on a detached copy of the reconstruction: its gradient there
        (and the adaptive weight, from the decoder's last-layer input) is taken with plain autograd,
        then pushed through the engine's graph by one `engine.backward` of the surrogate
        <recon, ∂loss/∂recon> + reg, which has the same parameter gradients as the loss itself.
        DeepSpeed allows no other autograd pass through an engine's outputs; the discriminator is
        called as a bare module here (frozen), so its engine sees only its own step.
        """
        pixels = batch["pixels"].to(self.device, self.g_engine.compute_dtype)
        disc_on = step >= self.cfg.ae_loss.disc_start and self.cfg.ae_loss.disc_factor > 0
        discriminator = self.d_engine.module

        recon, reg, indices = self.g_engine(pixels, self._posterior_generator())
        recon_leaf = recon.detach().float().requires_grad_(True)
        logits_fake = None
        if disc_on:
            discriminator.requires_grad_(False)
            logits_fake = discriminator(recon_leaf.to(recon.dtype)).float()
        cache: dict[str, torch.Tensor] = {}

        def adaptive_weight(nll: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            cache["nll"] = torch.autograd.grad(nll, recon_leaf, retain_graph=True)[0]
            cache["g"] = torch.autograd.grad(g, recon_leaf, retain_graph=True)[0]
            conv, h = self.autoencoder.decoder.conv_out, self._conv_out_input.float()
            return adaptive_weight_from_grads(conv_weight_grad(conv, h, cache["nll"]),
                                              conv_weight_grad(conv, h, cache["g"]), self.cfg.ae_loss.disc_weight)

        g_out = self.loss_fn.generator_loss(pixels.float(), recon_leaf, reg.float(), logits_fake, step,
                                            adaptive_weight)
        terms = g_out.terms
        logvar = self.loss_fn.logvar
        wrt = [recon_leaf] + ([logvar] if logvar.requires_grad else [])
        if "nll" not in cache:
            cache["nll"] = torch.autograd.grad(terms["nll"], recon_leaf, retain_graph=True)[0]
        grad_recon = cache["nll"]
        if "g" in terms:
            if "g" not in cache:
                cache["g"] = torch.autograd.grad(terms["g"], recon_leaf, retain_graph=True)[0]
            grad_recon = grad_recon + terms["adv_scale"] * cache["g"]
        surrogate = (recon.float() * grad_recon.detach()).sum() + terms["reg"]
        if len(wrt) > 1:  # the learned NLL log-variance has a direct gradient of its own
            grad_logvar = torch.autograd.grad(terms["nll"], logvar, retain_graph=True)[0]
            surrogate = surrogate + (logvar * grad_logvar.detach()).sum()
        self.micro_steps += 1
        # The surrogate can be finite where the loss is not: both players' steps are judged by the loss too.
        self.g_engine.backward(surrogate, judged_by=(g_out.loss,))
        self.g_engine.step()
        logs = dict(g_out.logs)
        if disc_on:
            discriminator.requires_grad_(True)
            logits_real = self.d_engine(pixels.detach())
            logits_fake = self.d_engine(recon.detach())
            d_out = self.loss_fn.discriminator_loss(logits_real.float(), logits_fake.float(), step)
            self.d_engine.backward(d_out.loss, judged_by=(g_out.loss,))
            self.d_engine.step()
            logs.update(d_out.logs)
        with torch.no_grad():
            logs["psnr"] = evaluation.psnr(pixels.float(), recon.float()).mean()
            if indices is not None:
                n_embed = self.autoencoder.quantize.n_embed
                logs.update(evaluation.codebook_stats_tensors(indices, n_embed))
        return logs

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint's client state needs beyond the engines and the loader (per rank)."""
        return {"micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_steps = int(state["micro_steps"])

    def sample(self, step: int, out_dir: Path) -> list[tuple[Path, str]]:
        """The trainer's periodic event: held-out PSNR/SSIM (logged) and a reconstruction grid."""
        result = self.evaluate(out_dir, tag=f"{step:08d}")
        metrics = result["metrics"]
        if self.logger is not None:
            self.logger.log(step, metrics)
        if result["grid_path"] is None:
            return []
        caption = f"top: input, bottom: reconstruction (PSNR {metrics['eval/psnr']:.2f} dB)"
        return [(result["grid_path"], caption)]

    def evaluate_samples(self, step: int) -> dict[str, float]:
        return {}  # stage 1's rFID comes with its reconstruction grids (sample)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, out_dir: str | Path | None = None, tag: str = "") -> dict[str, Any]:
        """PSNR/SSIM (and VQ codebook stats) on held-out shards, each rank a slice; a grid PNG on rank 0.

        Returns {"metrics": {...}, "grid_path": Path | None}. Deterministic reconstructions (posterior mode).
        """
        cfg = self.cfg.ae_loss
        urls = cfg.eval_shards or self.cfg.data.train_shards
        dataset = PixelShardDataset(urls, self.cfg.data.resolution)
        count = min(cfg.num_eval_samples, len(dataset))
        indices = list(range(self.rank, count, self.world_size))
        model = self.autoencoder
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # psnr, ssim, n, psnr of bicubic down-and-up (the baseline)
        factor = model.downsample_factor
        n_embed = model.quantize.n_embed if isinstance(model, VQModel) else 0
        code_counts = torch.zeros(max(n_embed, 1), dtype=torch.float64)
        grid_rows: list[torch.Tensor] = []
        batch = self.cfg.data.micro_batch_size
        inception = self._inception()
        real_stats, fake_stats = evaluation.FeatureStats(), evaluation.FeatureStats()
        for lo in range(0, len(indices), batch):
            pixels = torch.stack([dataset[i] for i in indices[lo:lo + batch]]).to(self.device)
            recon, codes = self.reconstruct(pixels)
            sums[0] += evaluation.psnr(pixels, recon).double().sum().cpu()
            sums[1] += evaluation.ssim(pixels, recon).double().sum().cpu()
            sums[2] += pixels.shape[0]
            sums[3] += evaluation.psnr(pixels.float(), bicubic_roundtrip(pixels.float(), factor)).double().sum().cpu()
            if inception is not None:
                real_stats.update(inception(pixels.float()))
                fake_stats.update(inception(recon.float()))
            if codes is not None:
                code_counts += torch.bincount(codes.flatten().cpu(), minlength=n_embed).double()
            if not grid_rows:
                k = cfg.num_grid_samples
                grid_rows = [pixels[:k].cpu(), recon[:k].float().cpu()]
        model.train(was_training)
        _all_reduce_sum(sums)
        metrics: dict[str, Any] = {"eval/psnr": float(sums[0] / sums[2]), "eval/ssim": float(sums[1] / sums[2]),
                                   f"eval/psnr_bicubic{factor}x": float(sums[3] / sums[2])}
        if inception is not None:  # rFID: held-out images vs their reconstructions (a few thousand for stable values)
            real_stats.all_reduce()
            fake_stats.all_reduce()
            metrics["eval/rfid"] = evaluation.frechet_distance(*real_stats.mean_cov(), *fake_stats.mean_cov())
        if n_embed:
            _all_reduce_sum(code_counts)
            stats = evaluation.codebook_stats_from_counts(code_counts)
            metrics.update({f"eval/{k}": v for k, v in stats.items()})
        grid_path = None
        if out_dir is not None and self.rank == 0 and grid_rows:
            grid_path = evaluation.save_grid(grid_rows, Path(out_dir) / f"recon_{tag or f'{self.step:08d}'}.png")
        return {"metrics": metrics, "grid_path": grid_path}

    def _inception(self) -> Optional[evaluation.InceptionFeatures]:
        """The rFID network (pytorch-fid's, as stage 2's FID), built once, when eval.inception_weights names a
        file or pytorch-fid's cache holds its weights."""
        weights = evaluation.resolve_inception_weights(self.cfg.eval.inception_weights)
        if weights is None:
            return None
        if self._inception_net is None:
            self._inception_net = evaluation.InceptionFeatures(weights).to(self.device)
        return self._inception_net

    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        model = self.autoencoder
        pixels = pixels.to(self.device, self.g_engine.compute_dtype)
        if isinstance(model, VQModel):
            out = model(pixels)
            return out.reconstruction.float(), out.indices
        recon, _ = model(pixels, sample_posterior=False)
        return recon.float(), None

    # ------------------------------------------------------------------ hand-off to stage 2
    @torch.no_grad()
    def estimate_latent_scale(self) -> tuple[float, float]:
        """(scale_factor, shift_factor) from training images: the estimate the cache manifest also makes
        (`LatentStats`, exact posterior moments; see ldmscale.latent_scale): zero mean, unit variance."""
        from ldmscale.data.cache_format import LatentStats

        n = self.cfg.ae_loss.estimate_scale_samples
        dataset = PixelShardDataset(self.cfg.data.train_shards, self.cfg.data.resolution)
        g = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(dataset), generator=g)[:n].tolist()
        stats = LatentStats()
        for lo in range(0, len(order), self.cfg.data.micro_batch_size):
            pixels = torch.stack([dataset[i] for i in order[lo:lo + self.cfg.data.micro_batch_size]])
            moments = self.autoencoder.encode_moments(pixels.to(self.device, self.g_engine.compute_dtype))
            stats.update_moments(moments.float().cpu(), self.cfg.autoencoder.kind)
        summary = stats.summary()
        return float(summary["scale_factor"]), float(summary["shift_factor"])

    def export(self, run_dir: str | Path) -> Path:
        """RUN_DIR/autoencoder (our format) and, for KL, RUN_DIR/autoencoder_diffusers (a diffusers
        AutoencoderKL folder), both carrying the estimated latent scale (and shift). Collective under
        ZeRO-3 (weights gathered); only rank 0 writes."""
        from ldmscale.models.interop import save_autoencoder

        scale, shift = self.estimate_latent_scale()
        out = Path(run_dir) / EXPORT_DIR
        with self.g_engine.gathered_parameters():
            if self.rank == 0:
                model = build_autoencoder(self.cfg.autoencoder)
                model.load_state_dict({k: v.detach().float().cpu() for k, v in self.autoencoder.state_dict().items()})
                model.scale_factor, model.shift_factor = scale, shift
                model.config.update(scale_factor=scale, shift_factor=shift)
                save_autoencoder(model, out, format="ldmscale")
                (Path(run_dir) / LATENT_SCALE_FILE).write_text(json.dumps(
                    {"scale_factor": scale, "shift_factor": shift, "step": self.step,
                     "num_images": self.cfg.ae_loss.estimate_scale_samples}, indent=2))
                if isinstance(model, AutoencoderKL) and model.config["z_channels"] == model.config["embed_dim"] \
                        and not model.bicubic_skip:
                    save_autoencoder(model, Path(run_dir) / DIFFUSERS_DIR, format="diffusers")
        return out


def bicubic_roundtrip(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """The baseline an f-`factor` autoencoder must beat: antialiased bicubic down by `factor`, bicubic up."""
    import torch.nn.functional as F

    from ldmscale.data.conditioning import low_res_of

    up = F.interpolate(low_res_of(pixels, factor), size=pixels.shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)


def load_autoencoder_from_run(run_dir: str | Path) -> AutoencoderKL | VQModel:
    """A stage-1 run directory (or any path `ldmscale.models.interop.load_autoencoder` takes) → the
    trained autoencoder in eval mode, with the latent scale estimated at the end of training."""
    from ldmscale.models.interop import load_autoencoder
    from ldmscale.runs import autoencoder_path

    return load_autoencoder(autoencoder_path(run_dir))


# ---------------------------------------------------------------------------- the stage-1 run
def train_autoencoder(cfg: Config, dist: Any) -> dict[str, Any]:
    """Train (or resume) stage 1 with the shared Trainer; at the end evaluate and export for stage 2.

    Called by `ldmscale.train.run` (stage=autoencoder) after the process group is up.
    """
    from ldmscale import checkpoint as ckpt
    from ldmscale.config import to_dict
    from ldmscale.metrics import build_logger
    from ldmscale.trainer import Trainer

    task = AutoencoderTask(cfg, rank=dist.rank, world_size=dist.world_size)
    loader = build_pixel_loader(cfg.data, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    logger = None
    try:
        trainer = Trainer(task, loader, cfg.trainer, checkpointer=ckpt.Checkpointer(cfg.checkpoint),
                          accumulation_steps=task.g_engine.gradient_accumulation_steps,
                          world_size=dist.world_size, run_dir=cfg.run_dir,
                          meta={"config": to_dict(cfg), "stage": "autoencoder"})
        trainer.resume()
        logger = build_logger(cfg.logger, cfg.run_dir, is_main=dist.is_main, config=to_dict(cfg),
                              total_steps=cfg.trainer.max_steps, initial_step=trainer.step, name=cfg.name)
        trainer.logger = task.logger = logger
        ckpt.SAVE_REQUEST.install()
        trainer.fit()
        metrics: dict[str, Any] = {}
        if trainer.step >= cfg.trainer.max_steps:
            result = task.evaluate(Path(cfg.run_dir) / "samples", tag="final")
            metrics = result["metrics"]
            logger.log(trainer.step, metrics)
            if result["grid_path"] is not None:
                logger.log_image(trainer.step, "reconstructions", result["grid_path"], "final")
            out = task.export(cfg.run_dir)
            logger.write(f"exported the autoencoder to {out}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics
    finally:
        if logger is not None:
            logger.close()
        for engine in task.engines().values():
            engine.destroy()
