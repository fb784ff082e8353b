"""Worker for the generic-machinery tests: a small MLP regression task through Engine/EMA/Trainer/Checkpointer.

usage: toy_train.py RUN_DIR ZERO_STAGE MAX_STEPS [EVERY_STEPS] [SLEEP_S]
"""

import sys
import time

import torch
from torch import nn

from ldmscale import checkpoint as ckpt
from ldmscale.config import CheckpointConfig, DeepSpeedConfig, LoggerConfig, OptimConfig, TrainerConfig
from ldmscale.distributed import engine as eng
from ldmscale.distributed import env
from ldmscale.ema import PartitionedEMA
from ldmscale.metrics import build_logger
from ldmscale.trainer import EngineTask, Trainer


class ToyLoader:
    """Deterministic resumable batches: batch i of an epoch is a pure function of (epoch, rank, i)."""

    def __init__(self, rank: int, batch: int = 8, num_batches: int = 5):
        self.rank, self.batch, self.num_batches = rank, batch, num_batches
        self.epoch, self.position = 0, 0

    def __iter__(self):
        while self.position < self.num_batches:
            g = torch.Generator().manual_seed(self.epoch * 1000 + self.rank * 100 + self.position)
            self.position += 1
            x = torch.randn(self.batch, 6, generator=g)
            yield {"x": x, "y": x[:, :3] - 0.5 * x[:, 3:]}
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


class ToyTask(EngineTask):
    def loss(self, batch):
        noise = 0.01 * torch.randn(batch["y"].shape, generator=self.generator)  # uses the task RNG
        return (self.engine(batch["x"]) - batch["y"] - noise).pow(2).mean(1)


def main() -> None:
    run_dir, stage, max_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    every = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    sleep_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    dist = env.setup("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    engine = eng.initialize(model, DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2, warmup_steps=2),
                            micro_batch_size=8, global_batch_size=8 * dist.world_size,
                            world_size=dist.world_size, max_steps=max_steps)
    task = ToyTask(engine, PartitionedEMA(engine.module, 0.9), seed=0, rank=dist.rank)
    trainer_cfg = TrainerConfig(max_steps=max_steps, log_every_steps=1)
    logger = build_logger(LoggerConfig(wandb_mode="disabled", progress_bar=False), run_dir,
                          is_main=dist.is_main, config=None, total_steps=max_steps)
    trainer = Trainer(task, ToyLoader(dist.rank), trainer_cfg,
                      checkpointer=ckpt.Checkpointer(CheckpointConfig(every_steps=every, keep_last=2),
                                                     f"{run_dir}/checkpoints"),
                      logger=logger, world_size=dist.world_size, run_dir=run_dir)
    trainer.resume()
    ckpt.SAVE_REQUEST.install()
    if sleep_s:
        orig = trainer.train_one_step

        def slow():
            time.sleep(sleep_s)
            return orig()

        trainer.train_one_step = slow
    trainer.fit()
    logger.close()
    engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
