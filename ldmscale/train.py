"""Entry point: `python -m ldmscale.train [+experiment=NAME] [overrides]` (compose → validate → run).

run(cfg) = env.setup → seed → save resolved config → build → resume → fit → teardown. It runs the same
under plain python, torchrun, the deepspeed launcher and srun (env.detect reads each launcher).
"""

from __future__ import annotations

import random
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from ldmscale.config import CONF_DIR, Config, register_configs, to_dict, to_object


def seed_everything(seed: int, rank: int) -> None:
    """Model init is identical on every rank (seed); data/noise randomness is per rank elsewhere."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def example_inputs(cfg: Config, batch: int = 1, device: str = "meta") -> tuple[Any, ...]:
    """(x_t, t, cond) for one denoiser call at the configured resolution (largest bucket), for FLOP counting.

    cond holds what `build_denoiser(cfg.model, cfg.conditioner)` consumes; the conditioning kind makes it."""
    from ldmscale.conditioning import kind_for

    factor = 2 ** (len(cfg.autoencoder.ch_mult) - 1)  # autoencoder downsampling
    h = w = cfg.data.resolution
    if cfg.data.buckets:
        h, w = max(cfg.data.buckets, key=lambda hw: hw[0] * hw[1])
    latents = torch.zeros(batch, cfg.model.out_channels, h // factor, w // factor, device=device)  # predicted
    t = torch.zeros(batch, dtype=torch.long, device=device)
    cond = kind_for(cfg.conditioner).example_cond(cfg.model, batch, (h // factor, w // factor), (h, w), device)
    return latents, t, cond


def flops_per_image(cfg: Config) -> int:
    """Forward FLOPs of the configured denoiser per image, counted on an uncompiled meta-device build (no
    memory, no weights: also right when the trained one is compiled or ZeRO-3 partitioned)."""
    import dataclasses

    from ldmscale.models import build_denoiser, count_flops

    try:
        with torch.device("meta"):
            denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=None, compile=False), cfg.conditioner)
        return count_flops(denoiser, *example_inputs(cfg))
    except Exception as error:  # an exotic conditioning the example misses: MFU shows 0, training goes on
        print(f"[ldmscale] FLOP count failed ({error}); MFU will read 0")
        return 0


def dry_run(cfg: Config, world_size: int) -> dict[str, Any]:
    """Build on the meta device and print params, FLOPs/image, DeepSpeed memory and batch arithmetic."""
    from ldmscale.distributed.engine import estimate_model_state_memory, gradient_accumulation_steps
    from ldmscale.models import build_denoiser

    with torch.device("meta"):
        denoiser = build_denoiser(cfg.model, cfg.conditioner)
    params = sum(p.numel() for p in denoiser.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in denoiser.modules())
    flops = flops_per_image(cfg)
    accumulation = gradient_accumulation_steps(cfg.data.global_batch_size, cfg.data.micro_batch_size, world_size)
    lines = [
        f"experiment      {cfg.name}",
        f"parameters      {params / 1e9:.3f} B ({params:,})",
        f"FLOPs/image     {flops / 1e9:,.2f} GFLOP forward, {3 * flops / 1e9:,.2f} GFLOP train step (3x)",
        f"batch           global {cfg.data.global_batch_size} = micro {cfg.data.micro_batch_size} × "
        f"accumulation {accumulation} × world {world_size}",
        "DeepSpeed model-state memory per GPU (params+grads+Adam; activations extra):",
    ]
    report: dict[str, Any] = {"params": params, "flops_per_image": flops, "accumulation": accumulation,
                              "memory": {}}
    offload_opt = cfg.deepspeed.offload_optimizer != "none"
    offload_par = cfg.deepspeed.offload_param != "none"
    scenarios = [(cfg.deepspeed.zero_stage, world_size)] + [(s, n) for s in (2, 3) for n in (8, 64)]
    for stage, gpus in scenarios:
        est = estimate_model_state_memory(params, largest, zero_stage=stage, num_gpus=gpus,
                                          offload_optimizer=offload_opt, offload_param=offload_par)
        report["memory"][(stage, gpus)] = est.gpu_bytes
        lines.append(f"  ZeRO-{stage} on {gpus:>3} GPUs: {est.gpu_bytes / 2**30:8.2f} GiB/GPU"
                     + (f" (+{est.cpu_bytes_per_node / 2**30:.0f} GiB CPU/node)" if est.offload else ""))
    print("\n".join(lines), flush=True)
    return report


def build_training_denoiser(cfg: Config, dist: Any) -> torch.nn.Module:
    """The denoiser to train, with its initial weights, on this rank's device. Under ZeRO-3 with
    deepspeed.zero3_init each rank materialises only its partition of every parameter (deepspeed.zero.Init)."""
    from ldmscale.distributed import engine as eng
    from ldmscale.models import build_denoiser

    zero3_init = cfg.deepspeed.zero3_init and cfg.deepspeed.zero_stage == 3
    if zero3_init and (cfg.model.weights or cfg.checkpoint.load_weights_only):
        raise ValueError("deepspeed.zero3_init=true builds the denoiser already partitioned, and loading "
                         "model.weights / checkpoint.load_weights_only into partitions is not supported: set "
                         "deepspeed.zero3_init=false to start from weights")
    ds_config = eng.build_ds_config(cfg.deepspeed, cfg.optim, micro_batch_size=cfg.data.micro_batch_size,
                                    global_batch_size=cfg.data.global_batch_size, world_size=dist.world_size)
    with eng.zero3_init_context(ds_config, zero3_init):
        denoiser = build_denoiser(cfg.model, cfg.conditioner)
    if cfg.checkpoint.load_weights_only:
        from ldmscale.checkpoint import load_weights

        load_weights(denoiser, cfg.checkpoint.load_weights_only)
    if torch.cuda.is_available() and not zero3_init:  # zero.Init already placed the partitions
        denoiser = denoiser.to(f"cuda:{dist.local_rank}")
    return denoiser


def build_diffusion_task(cfg: Config, dist: Any) -> tuple[Any, Any, int, float]:
    """Engine(denoiser) + objective + EMA → DiffusionTask; also returns loader, accumulation, FLOPs/image."""
    from ldmscale.data.loader import build_loader
    from ldmscale.diffusion.objective import DiffusionObjective
    from ldmscale.distributed import engine as eng
    from ldmscale.ema import SNAPSHOT_DIR, build_ema
    from ldmscale.evaluation.generated import LoopEvaluation
    from ldmscale.trainer import DiffusionTask, SampleGrid

    denoiser = build_training_denoiser(cfg, dist)
    engine = eng.initialize(denoiser, cfg.deepspeed, cfg.optim, micro_batch_size=cfg.data.micro_batch_size,
                            global_batch_size=cfg.data.global_batch_size, world_size=dist.world_size,
                            max_steps=cfg.trainer.max_steps)
    flops = flops_per_image(cfg)
    ema = build_ema(engine.module, cfg.ema, snapshot_dir=f"{cfg.checkpoint.dir}/{SNAPSHOT_DIR}",
                    max_steps=cfg.trainer.max_steps)
    task = DiffusionTask(engine, DiffusionObjective(cfg.diffusion), ema, conditioning=denoiser.conditioning,
                         ucg_rate=cfg.conditioner.ucg_rate, seed=cfg.seed, rank=dist.rank,
                         sampler=SampleGrid(cfg) if cfg.trainer.sample_every_steps else None,
                         evaluator=LoopEvaluation(cfg) if cfg.eval.every_steps else None)
    loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=cfg.seed, rank=dist.rank,
                          world_size=dist.world_size)
    return task, loader, engine.gradient_accumulation_steps, flops


def run(cfg: Config) -> None:
    """Run one job described by `cfg` in this process (under python, torchrun, deepspeed or srun).

    Any rank's exception ends the whole job with that exception printed (env.fail_fast), never a hang.
    """
    from ldmscale.distributed import env

    if cfg.dry_run:
        dry_run(cfg, env.detect().world_size)
        return
    dist = env.setup(cfg.deepspeed.backend)
    with env.fail_fast(dist):
        _run_stage(cfg, dist)
    env.teardown()


def _run_stage(cfg: Config, dist: Any) -> None:
    from ldmscale import checkpoint as ckpt
    from ldmscale.config import check_paths, save_resolved
    from ldmscale.metrics import build_logger, detect_peak_flops
    from ldmscale.trainer import Trainer

    engines: dict[str, Any] = {}
    logger = None
    try:
        check_paths(cfg)
        seed_everything(cfg.seed, dist.rank)
        if dist.is_main:
            save_resolved(cfg, cfg.run_dir)
        if cfg.stage == "autoencoder":
            from ldmscale.stage1 import train_autoencoder

            train_autoencoder(cfg, dist)
            return
        task, loader, accumulation, flops = build_diffusion_task(cfg, dist)
        engines = task.engines()
        checkpointer = ckpt.Checkpointer(cfg.checkpoint)
        trainer = Trainer(task, loader, cfg.trainer, checkpointer=checkpointer, accumulation_steps=accumulation,
                          world_size=dist.world_size, run_dir=cfg.run_dir, meta={"config": to_dict(cfg)},
                          flops_per_image=flops, peak_flops=detect_peak_flops(cfg.trainer.peak_flops),
                          eval_every_steps=cfg.eval.every_steps)
        trainer.resume()
        logger = build_logger(cfg.logger, cfg.run_dir, is_main=dist.is_main, config=to_dict(cfg),
                              total_steps=cfg.trainer.max_steps, initial_step=trainer.step, name=cfg.name)
        trainer.logger = logger
        from ldmscale.latent_scale import report

        logger.write(f"[ldmscale] {report(cfg.autoencoder, cfg.data)}")  # what the grids and exports decode with
        ckpt.SAVE_REQUEST.install()
        trainer.fit()
    finally:  # local cleanup only (no collectives): it also runs on the way out of a failure
        if logger is not None:
            logger.close()
        for engine in engines.values():
            engine.destroy()


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ldmscale.distributed import env
    from ldmscale.launch import launch

    cfg = to_object(composed)
    if cfg.stage == "demo" and not cfg.dry_run:  # the whole pipeline; each of its steps is an ordinary run
        if cfg.launcher.kind != "local":
            raise SystemExit("stage=demo runs here, step by step; to use SLURM, submit its steps as "
                             "experiments (e.g. +experiment=ae_demo launcher=slurm), not the demo pipeline")
        if env.detect().world_size > 1:  # every rank would run the pipeline and write the same files
            raise SystemExit("stage=demo (the default without +experiment) runs the whole pipeline from one "
                             "process: start it with `python -m ldmscale.train`, not torchrun/srun; to train one "
                             "of its steps on several ranks, launch that step (e.g. +experiment=demo "
                             "data.train_shards=[RUN_DIR/cache]) under torchrun")
        from ldmscale.pipeline import run_demo

        run_demo(cfg, list(HydraConfig.get().overrides.task))
        return
    launch(cfg)


if __name__ == "__main__":
    import sys

    from ldmscale.config import normalize_overrides

    sys.argv[1:] = normalize_overrides(sys.argv[1:])  # brace patterns and bare paths in list keys
    main()
