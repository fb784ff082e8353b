"""Worker for the power-EMA tests: the toy MLP through Engine/PowerEMA/Trainer/Checkpointer.

usage: power_ema_train.py RUN_DIR ZERO_STAGE MAX_STEPS [STOP_AT]
Every step sees the same 8 samples whatever the world size (each rank takes its share), so 1 and 2 ranks
train the same weights. Snapshots every 3 steps, checkpoints every 4; STOP_AT asks for a save-and-stop
after that step (as SIGTERM would), so re-running without it resumes. At the end rank 0 writes
RUN_DIR/reference.pt: every profile's live full EMA.
"""

import sys

import torch
from torch import nn
from toy_train import ToyLoader

from ldmscale import checkpoint as ckpt
from ldmscale.config import CheckpointConfig, DeepSpeedConfig, LoggerConfig, OptimConfig, TrainerConfig
from ldmscale.distributed import engine as eng
from ldmscale.distributed import env
from ldmscale.ema import SNAPSHOT_DIR, PowerEMA
from ldmscale.metrics import build_logger
from ldmscale.trainer import EngineTask, Trainer

GLOBAL_BATCH = 8


class SharedBatchLoader(ToyLoader):
    """Batch i of an epoch is one fixed set of GLOBAL_BATCH samples; rank r takes rows r::world."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank, batch=GLOBAL_BATCH)
        self.world = world

    def __iter__(self):
        while self.position < self.num_batches:
            g = torch.Generator().manual_seed(self.epoch * 1000 + self.position)
            self.position += 1
            x = torch.randn(GLOBAL_BATCH, 6, generator=g)[self.rank::self.world]
            yield {"x": x, "y": x[:, :3] - 0.5 * x[:, 3:]}
        self.position = 0


class RegressionTask(EngineTask):
    def loss(self, batch):
        return (self.engine(batch["x"]) - batch["y"]).pow(2).mean(1)


def main() -> None:
    run_dir, stage, max_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    dist = env.setup("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    micro = GLOBAL_BATCH // dist.world_size
    engine = eng.initialize(model, DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2, warmup_steps=2),
                            micro_batch_size=micro, global_batch_size=GLOBAL_BATCH,
                            world_size=dist.world_size, max_steps=max_steps)
    ckpt_dir = f"{run_dir}/checkpoints"
    ema = PowerEMA(engine.module, [0.05, 0.10], snapshot_every_steps=3, snapshot_dir=f"{ckpt_dir}/{SNAPSHOT_DIR}",
                   final_step=max_steps)
    task = RegressionTask(engine, ema, seed=0, rank=dist.rank)
    logger = build_logger(LoggerConfig(wandb_mode="disabled", progress_bar=False), run_dir,
                          is_main=dist.is_main, config=None, total_steps=max_steps)
    trainer = Trainer(task, SharedBatchLoader(dist.rank, dist.world_size),
                      TrainerConfig(max_steps=max_steps, log_every_steps=1),
                      checkpointer=ckpt.Checkpointer(CheckpointConfig(every_steps=4, keep_last=1), ckpt_dir),
                      logger=logger, world_size=dist.world_size, run_dir=run_dir)
    trainer.resume()
    if stop_at is not None:
        step_once = trainer.train_one_step

        def step_then_maybe_stop():
            out = step_once()
            if trainer.step == stop_at:
                trainer.checkpointer.request.request(stop=True)
            return out

        trainer.train_one_step = step_then_maybe_stop
    trainer.fit()
    profiles = [ema.full_state_dict(i) for i in range(len(ema.sigma_rels))]  # collective
    total = sum(v.numel() for v in profiles[0].values())
    if dist.world_size > 1:  # every profile holds only this rank's partition
        assert all(sum(s.numel() for s in shadow) < total for shadow in ema.shadows), "EMA not partitioned"
    if dist.is_main and trainer.step == max_steps:
        torch.save({"profiles": profiles, "step": trainer.step}, f"{run_dir}/reference.pt")
    logger.close()
    engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
