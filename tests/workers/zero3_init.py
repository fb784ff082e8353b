"""2-rank worker: ZeRO-3 construction with deepspeed.zero3_init=ZERO3_INIT (true|false) through
train.build_training_denoiser; peak RSS growth while building (Linux VmHWM, reset through clear_refs) against
the model's fp32 bytes, then one real training step. Prints JSON from every rank.

usage: zero3_init.py ZERO3_INIT
"""

import json
import sys
from pathlib import Path

import torch

from ldmscale.config import compose
from ldmscale.diffusion.objective import DiffusionObjective
from ldmscale.distributed import engine as eng
from ldmscale.distributed import env
from ldmscale.train import build_training_denoiser, example_inputs
from ldmscale.trainer import DiffusionTask


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    zero3_init = sys.argv[1]
    dist = env.setup("gloo")
    # ~46M parameters (185 MB fp32): far above the RSS noise of building modules.
    cfg = compose(["deepspeed.zero_stage=3", f"deepspeed.zero3_init={zero3_init}", "model.model_channels=128",
                   "model.channel_mult=[1,2,4]", "model.num_res_blocks=2", "data.micro_batch_size=1",
                   f"data.global_batch_size={dist.world_size}"])
    torch.manual_seed(cfg.seed)
    # Warm-up: the same path with the tiny default U-Net loads DeepSpeed's lazy modules and ops (~100 MB
    # of RSS that is not parameters) before the measured build.
    tiny = compose(["deepspeed.zero_stage=3", f"deepspeed.zero3_init={zero3_init}", "data.micro_batch_size=1",
                    f"data.global_batch_size={dist.world_size}"])
    build_training_denoiser(tiny, dist)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = status_kib("VmRSS")
    denoiser = build_training_denoiser(cfg, dist)
    peak = (status_kib("VmHWM") - before) * 1024
    params = list(denoiser.parameters())
    partitioned = all(hasattr(p, "ds_tensor") for p in params)
    full = sum((p.ds_numel if partitioned else p.numel()) * p.element_size() for p in params)
    local = sum((p.ds_tensor.numel() if partitioned else p.numel()) * p.element_size() for p in params)
    del params

    # The partitioned module trains as it is: DeepSpeed's ZeRO-3 engine takes it, one real step.
    engine = eng.initialize(denoiser, cfg.deepspeed, cfg.optim, micro_batch_size=1,
                            global_batch_size=dist.world_size, world_size=dist.world_size, max_steps=1)
    task = DiffusionTask(engine, DiffusionObjective(cfg.diffusion), None, conditioning=denoiser.conditioning,
                         ucg_rate=0.0, seed=cfg.seed, rank=dist.rank)
    latents, _, cond = example_inputs(cfg, batch=1, device="cpu")
    batch = {"latents": torch.randn(latents.shape), **{k: torch.randn(v.shape) for k, v in cond.items()}}
    loss = task.train_step([batch], 0)["loss"].item()
    # Both ranks share the test's stdout: one write per line (print's separate "\n" write interleaves
    # with the other rank's under PYTHONUNBUFFERED=1, as in CI).
    sys.stdout.write(json.dumps({"rank": dist.rank, "zero3_init": zero3_init, "partitioned": partitioned,
                                 "peak": peak, "full": full, "local": local, "loss": loss}) + "\n")
    sys.stdout.flush()
    task.engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
