"""A tiny 2-rank trainer for the launcher tests until ldmscale.train.run trains: same contract
(re-running resumes; stops and saves when a save is requested, all ranks agreeing)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from ldmscale.config import Config
from ldmscale.distributed import env


def _save_requested() -> bool:
    handler = signal.getsignal(signal.SIGUSR2)
    return bool(getattr(getattr(handler, "__self__", None), "received", False))


def run(cfg: Config) -> None:
    dist = env.setup("gloo")
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "ckpt.pt"
    torch.manual_seed(cfg.seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    if dist.is_main:
        with open(run_dir / "starts.txt", "a") as f:
            f.write(f"{step}\n")

    def save() -> None:
        if dist.is_main:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
        tdist.barrier()

    loss = torch.zeros(())
    while step < cfg.trainer.max_steps:
        stop = torch.tensor([float(_save_requested())])
        tdist.all_reduce(stop, op=tdist.ReduceOp.MAX)
        if stop.item():
            save()
            return
        gen = torch.Generator().manual_seed(step * 100 + dist.rank)
        x = torch.randn(4, 8, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            tdist.all_reduce(p.grad)
            p.grad /= dist.world_size
        opt.step()
        step += 1
        if dist.is_main:
            (run_dir / "progress.txt").write_text(str(step))
        if step % cfg.checkpoint.every_steps == 0:
            save()
        time.sleep(0.1)
    save()
    tdist.all_reduce(loss)
    if dist.is_main:
        (run_dir / "final.json").write_text(json.dumps({"step": step, "loss": loss.item() / dist.world_size}))
    env.teardown()
