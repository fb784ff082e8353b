"""Worker for the generic-machinery tests: a small MLP regression task through Engine/EMA/Trainer/Checkpointer.

usage: toy_train.py RUN_DIR ZERO_STAGE MAX_STEPS [EVERY_STEPS] [SLEEP_S]
With TOY_DUMP_REFERENCE=1, rank 0 also writes RUN_DIR/reference.pt: the live full EMA and gathered
weights at the end, which offline consolidation (ldmscale.checkpoint.load_run_weights) must reproduce.

Fault injection (tests/test_faults.py): TOY_FAULT=RANK:start or RANK:step:N raises on that rank at start-up
or in step N (printing "FAULT <unix time>" first); TOY_STALL=RANK:step:N sleeps 120 s there; TOY_NAN_FROM=N makes every loss from step N non-finite;
TOY_LR overrides the learning rate (1e-2).
"""

import os
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


def fault(rank: int, where: str) -> None:
    if os.environ.get("TOY_STALL") == f"{rank}:{where}":  # busy outside any collective (a slow read)
        time.sleep(120)
    if os.environ.get("TOY_FAULT") == f"{rank}:{where}":
        print(f"FAULT {time.time():.3f}", flush=True)
        raise RuntimeError(f"injected fault on rank {rank} at {where}")


class ToyTask(EngineTask):
    nan_from = int(os.environ.get("TOY_NAN_FROM", 0)) or None

    def loss(self, batch):
        noise = 0.01 * torch.randn(batch["y"].shape, generator=self.generator)  # uses the task RNG
        loss = (self.engine(batch["x"]) - batch["y"] - noise).pow(2).mean(1)
        return loss * float("nan") if self.nan_from and self.step + 1 >= self.nan_from else loss

    def train_step(self, micro_batches, step):
        self.step = step
        fault(self.rank, f"step:{step + 1}")
        return super().train_step(micro_batches, step)


def main() -> None:
    dist = env.setup("gloo")
    with env.fail_fast(dist):
        train(dist)
    env.teardown()


def train(dist) -> None:
    run_dir, stage, max_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    every = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    sleep_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    fault(dist.rank, "start")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    lr = float(os.environ.get("TOY_LR", 1e-2))
    engine = eng.initialize(model, DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=lr, warmup_steps=2),
                            micro_batch_size=8, global_batch_size=8 * dist.world_size,
                            world_size=dist.world_size, max_steps=max_steps)
    task = ToyTask(engine, PartitionedEMA(engine.module, 0.9), seed=0, rank=dist.rank)
    task.rank = dist.rank
    trainer_cfg = TrainerConfig(max_steps=max_steps, log_every_steps=1,
                                max_nonfinite_steps=int(os.environ.get("TOY_MAX_NONFINITE", 10)))
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
    if os.environ.get("TOY_DUMP_REFERENCE") == "1":
        full_ema = task.ema.full_state_dict()  # collective
        with engine.gathered_parameters():
            raw = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        if dist.is_main:
            torch.save({"ema": full_ema, "raw": raw}, f"{run_dir}/reference.pt")
    logger.close()
    engine.destroy()


if __name__ == "__main__":
    main()
