"""The training loop, as a list of events: step → maybe log → maybe sample → maybe checkpoint → stop?

Everything stage-specific lives in a `Task` (stage 2: `DiffusionTask`; stage 1: the autoencoder task),
so both stages share this loop, checkpointing, resume and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from ldmscale import checkpoint as ckpt
from ldmscale.config import TrainerConfig
from ldmscale.distributed import env
from ldmscale.metrics import NullLogger, Throughput, mfu, peak_memory_gb


class Task(Protocol):
    """What the loop trains. `train_step` does forward/backward/step for one optimiser step."""

    def engines(self) -> dict[str, Any]: ...  # name → Engine, saved/loaded by the checkpointer

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        """Returns detached tensors: at least "loss" (mean over micro-batches) and "skipped" (0/1), left on
        the device: the trainer reads them only on its sync steps."""
        ...

    def state_dict(self) -> dict[str, Any]: ...  # this rank's extra state: EMA partition, generators

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def sample(self, step: int, out_dir: Path) -> list[tuple[Path, str]]:
        """Collective; writes sample grids and returns [(png path, caption)] (empty on non-main ranks)."""
        ...

    def evaluate_samples(self, step: int) -> dict[str, float]:
        """Collective; sample-quality metrics (FID, CLIP score) of the current weights, the same on all ranks."""
        ...


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class Trainer:
    """Runs a Task over a resumable loader; owns step/images counters and the periodic events."""

    def __init__(self, task: Task, loader: Iterable[dict[str, Any]], cfg: TrainerConfig, *,
                 checkpointer: ckpt.Checkpointer, logger: NullLogger | None = None,
                 accumulation_steps: int = 1, world_size: int = 1, run_dir: str | Path = ".",
                 meta: dict[str, Any] | None = None, flops_per_image: float = 0.0, peak_flops: float = 1e12,
                 eval_every_steps: int = 0):
        self.task, self.loader, self.cfg = task, loader, cfg
        self.checkpointer = checkpointer
        self.logger = logger or NullLogger()
        self.accumulation_steps, self.world_size = accumulation_steps, world_size
        self.run_dir = Path(run_dir)
        self.meta = meta or {}
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.eval_every_steps = eval_every_steps
        self.step = 0
        self.images_seen = 0
        self.epoch = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._iter: Iterator[dict[str, Any]] | None = None
        self._stats: torch.Tensor | None = None  # device-side step statistics, see train_one_step
        self.throughput = Throughput()

    # ---- the loop
    def fit(self) -> None:
        self.throughput.reset()
        while self.step < self.cfg.max_steps:
            out = self.train_one_step()
            self.maybe_log(out)
            self.maybe_sample()
            self.maybe_evaluate()
            save, stop = self.checkpointer.request.agreed() if self.should_sync(self.step) else (False, False)
            if self.check_nonfinite(out):
                break
            self.maybe_checkpoint(requested=save)
            if stop:
                break
        else:
            if self.checkpointer.cfg.save_at_end and self.checkpointer.last_saved_step != self.step:
                self.save()

    # ---- events
    def train_one_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step. Loss and non-finite bookkeeping stay on the device (no host sync here)."""
        t0 = time.perf_counter()
        micro_batches = [self._next_batch() for _ in range(self.accumulation_steps)]
        data_wait = time.perf_counter() - t0
        for engine in self.task.engines().values():  # a gradient norm is taken only for a logged step
            engine.track_grad_norm = self.should_log(self.step + 1)
        out = self.task.train_step(micro_batches, self.step)
        self.step += 1
        images = sum(_batch_size(b) for b in micro_batches) * self.world_size
        self.images_seen += images
        self.throughput.add(images, data_wait)
        loss = out["loss"].detach().float()
        skipped = out["skipped"].to(loss.device, torch.float32)
        if self._stats is None:
            self._stats = torch.zeros(5, device=loss.device)
        # [loss sum, loss count, consecutive skipped, longest run since the last check, skipped total]
        run = (self._stats[2] + 1) * skipped
        self._stats = torch.stack([self._stats[0] + torch.where(skipped > 0, 0.0, loss),
                                   self._stats[1] + 1 - skipped, run,
                                   torch.maximum(self._stats[3], run), self._stats[4] + skipped])
        self.logger.advance()
        return out

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every_steps == 0 or step == self.cfg.max_steps

    def should_sync(self, step: int) -> bool:
        """Steps where the host may wait for the device: logged, signal-check and checkpoint steps.

        Signals are agreed across ranks and non-finite steps counted only here; a SIGTERM waits at most
        checkpoint.signal_check_steps steps, a run of non-finite steps is seen at the next such step."""
        return (self.should_log(step) or step % self.checkpointer.cfg.signal_check_steps == 0
                or self.checkpointer.should_save(step))

    def maybe_log(self, out: dict[str, torch.Tensor]) -> None:
        if not self.should_log(self.step):
            return
        loss = (self._stats[0] / self._stats[1].clamp(min=1)).reshape(1)
        if tdist.is_available() and tdist.is_initialized() and self.world_size > 1:
            tdist.all_reduce(loss)
            loss /= self.world_size
        rates = self.throughput.report()
        record = {"loss": loss.item(), "images_seen": self.images_seen, "epoch": self.epoch,
                  "nonfinite_steps": self.nonfinite_total + int(self._stats[4].item()), **rates,
                  "mfu": mfu(rates["images_per_sec"], self.flops_per_image, self.world_size, self.peak_flops),
                  "peak_mem_gb": peak_memory_gb()}
        for name, engine in self.task.engines().items():
            prefix = "" if len(self.task.engines()) == 1 else f"{name}/"
            if not engine.global_steps:  # e.g. stage 1's discriminator before ae_loss.disc_start: nothing to say
                continue
            record[f"{prefix}lr"] = engine.lr()
            record[f"{prefix}grad_norm"] = engine.grad_norm()
        for key, value in out.items():
            if key not in ("loss", "skipped") and torch.is_tensor(value) and value.numel() == 1:
                record[key] = value.item()
        self.logger.log(self.step, record)
        self._stats = torch.cat([torch.zeros(2, device=self._stats.device), self._stats[2:]])

    def maybe_sample(self) -> None:
        every = self.cfg.sample_every_steps
        if every and self.step % every == 0:
            for path, caption in self.task.sample(self.step, self.run_dir / "samples"):
                self.logger.log_image(self.step, "samples", path, caption)

    def maybe_evaluate(self) -> None:
        every = self.eval_every_steps
        if every and self.step % every == 0:
            metrics = self.task.evaluate_samples(self.step)
            if metrics:
                self.logger.log(self.step, metrics)

    def maybe_checkpoint(self, requested: bool = False) -> None:
        if requested or self.checkpointer.should_save(self.step):
            self.save()
            self.checkpointer.request.clear()

    def check_nonfinite(self, out: dict[str, torch.Tensor]) -> bool:
        """On sync steps, count the skipped (non-finite) steps since the last check; after
        max_nonfinite_steps in a row stop, naming the last good checkpoint. Other steps: no host sync.

        No checkpoint is written during a streak (see save): the weights may have diverged a step before
        the loss turned non-finite (a huge but finite gradient), so the good state is the last checkpoint
        saved before the streak, which stays `latest` and is kept by retention.
        """
        if self._stats is None or not self.should_sync(self.step):
            return False
        _, _, in_a_row, longest, total = (int(v) for v in self._stats.tolist())
        self._stats = torch.cat([self._stats[:3], self._stats[2:3], torch.zeros(1, device=self._stats.device)])
        self.nonfinite_in_a_row = in_a_row
        if not total:
            return False
        self.nonfinite_total += total
        self.logger.write(f"step {self.step}: {total} non-finite loss(es) since the last check, steps skipped "
                          f"(longest run {longest}/{self.cfg.max_nonfinite_steps} in a row)")
        if longest < self.cfg.max_nonfinite_steps:
            return False
        # The streak lies between the last check and this one; it starts exactly here if it is still going on.
        first_bad = self.step - longest + 1 if in_a_row == longest else None
        seen = f"at step {first_bad}" if first_bad else f"before step {self.step}"
        steps = f"steps {first_bad}..{self.step}" if first_bad else f"up to step {self.step}"
        good = ckpt.latest_tag(self.checkpointer.dir)
        if good is not None and (self.checkpointer.dir / good / ckpt.META).is_file():
            where = (f"The last good weights are those of step {int(good.split('_')[1])}, in "
                     f"{self.checkpointer.dir / good} (saved before the first non-finite loss {seen}; "
                     "it stays 'latest'). Re-run the same command with a lower LR "
                     "(e.g. optim.lr=<a third of it>; the configured LR wins on resume) to go on from there; "
                     "if it diverges again, point checkpoints/latest at an older step_* folder")
        else:
            where = ("No checkpoint was saved before the divergence: start again with a lower optim.lr")
        raise NonFiniteLossError(
            f"{longest} consecutive non-finite losses, {steps} "
            f"(trainer.max_nonfinite_steps={self.cfg.max_nonfinite_steps}). {where}. Also consider a longer "
            "optim.warmup_steps, deepspeed.precision=bf16/fp32, or checking the data"
        )

    # ---- state
    def save(self) -> Path | None:
        """Collective checkpoint of the whole state; skipped while losses are non-finite (see check_nonfinite)."""
        if self.nonfinite_in_a_row:
            self.logger.write(f"step {self.step}: no checkpoint while losses are non-finite; 'latest' keeps "
                              "the last good state")
            return None
        client = {"step": self.step, "images_seen": self.images_seen, "epoch": self.epoch,
                  "nonfinite_total": self.nonfinite_total, "rng": ckpt.rng_state(),
                  "loader": _loader_state(self.loader), "task": self.task.state_dict()}
        path = self.checkpointer.save(self.step, self.task.engines(), client, self.meta)
        self.logger.write(f"saved checkpoint {path} (step {self.step}, {self.images_seen} images)")
        return path

    def resume(self) -> bool:
        """Load the latest complete checkpoint if there is one (re-running the same command resumes)."""
        tag = self.checkpointer.resume_tag()
        if tag is None:
            return False
        state = self.checkpointer.load(tag, self.task.engines())
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.epoch, self.nonfinite_total = state["epoch"], state["nonfinite_total"]
        self.task.load_state_dict(state["task"])
        if state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
        self._iter = None
        ckpt.set_rng_state(state["rng"])
        self.checkpointer.last_saved_step = self.step
        # The run's logger is attached after resume (it needs the step), so say it on the console too.
        env.print0(f"[ldmscale] resumed from {self.checkpointer.dir / tag} at step {self.step}")
        return True

    def _next_batch(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._iter = iter(self.loader)
            return next(self._iter)


def _loader_state(loader: Any) -> Any:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 0


# ---------------------------------------------------------------------------- tasks


class EngineTask:
    """One DeepSpeed engine, a per-sample loss and an EMA: the shared core of single-network tasks.

    A non-finite loss on any rank and micro-batch drops the whole optimiser step on every rank (see
    Engine.backward) and the EMA update with it, decided on the device: no host sync per step.
    """

    name = "model"

    def __init__(self, engine: Any, ema: Any | None, *, seed: int, rank: int):
        self.engine, self.ema = engine, ema
        self.generator = torch.Generator(device=engine.device).manual_seed(seed * 100_003 + rank)

    def engines(self) -> dict[str, Any]:
        return {self.name: self.engine}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:  # per-sample [B]
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        total = torch.zeros((), device=self.engine.device)
        for batch in micro_batches:
            loss = self.loss(batch).mean()
            self.engine.backward(loss)
            self.engine.step()
            total = total + loss.detach().float()
        skipped = self.engine.skipped  # device 0/1: the optimiser update was dropped (non-finite)
        if self.ema is not None:
            self.ema.update(step, applied=1.0 - skipped)
        return {"loss": total / len(micro_batches), "skipped": skipped}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def sample(self, step: int, out_dir: Path) -> list[tuple[Path, str]]:
        return []

    def evaluate_samples(self, step: int) -> dict[str, float]:
        return {}


def _to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if not torch.is_tensor(value):
        return value
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype, non_blocking=True)
    return value.to(device=device, non_blocking=True)


class DiffusionTask(EngineTask):
    """Stage 2: engine(denoiser) + DiffusionObjective + EMA, with CFG condition dropout."""

    name = "denoiser"

    def __init__(self, engine: Any, objective: Any, ema: Any | None, *, conditioning: Any, ucg_rate: float,
                 seed: int, rank: int, sampler: Any | None = None,
                 evaluator: Any | None = None):
        """conditioning: the kind (`ldmscale.conditioning.kind_for(cfg.conditioner)`): which batch keys the
        denoiser takes, any frozen encoding of cached token ids, and the CFG drop."""
        super().__init__(engine, ema, seed=seed, rank=rank)
        self.objective = objective
        self.conditioning, self.ucg_rate = conditioning, ucg_rate
        self.sampler = sampler  # builds EMA sample grids (SampleGrid)
        self.evaluator = evaluator  # FID / CLIP score of the EMA weights (evaluation.LoopEvaluation)

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The engine in its compute dtype; the objective sees float32."""
        dtype = self.engine.compute_dtype
        cond = {k: _to_device(v, x_t.device, dtype) for k, v in cond.items()}
        return self.engine(x_t.to(dtype), t, cond).float()

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        device = self.engine.device
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
        cond = {k: _to_device(batch[k], device) for k in self.conditioning.cond_keys if k in batch}
        cond = self.conditioning.drop(self.conditioning.prepare(cond), self.ucg_rate, self.generator)
        return self.objective.loss(self.model_fn, latents, cond, generator=self.generator)

    def sample(self, step: int, out_dir: Path) -> list[tuple[Path, str]]:
        if self.sampler is None or self.ema is None:
            return []
        return self.sampler(self.ema, step, out_dir)

    def evaluate_samples(self, step: int) -> dict[str, float]:
        if self.evaluator is None or self.ema is None:
            return {}
        return self.evaluator(self.ema, step)


class SampleGrid:
    """Fixed prompts and seeds → EMA denoiser → ldmscale.inference.generate → one PNG grid (main rank writes)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._models: Any = None

    def __call__(self, ema: Any, step: int, out_dir: Path) -> list[tuple[Path, str]]:
        from ldmscale.distributed import env

        weights = ema.full_state_dict()  # collective: every rank takes part in the gather
        if not env.is_main():
            return []
        from ldmscale.inference import SampleInputs, SamplingSettings, generate
        from ldmscale.runs import build_models

        cfg = self.cfg
        prompts = list(cfg.trainer.sample_prompts)
        if self._models is None:
            device = next(iter(weights.values())).device
            self._models = build_models(cfg, device=device)
        inputs = self._models.denoiser.conditioning.grid_inputs(prompts)
        if inputs is None:  # layout/sr/inpaint grids need per-image inputs
            return []
        denoiser = self._models.denoiser
        denoiser.load_state_dict(weights, strict=False)  # trainable parameters; buffers stay as built
        settings = SamplingSettings(seed=cfg.trainer.sample_seed, num_steps=cfg.trainer.sample_steps,
                                    batch_size=len(prompts), progress=False)
        generation = generate(self._models, SampleInputs.of(inputs), settings)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:08d}.png"
        _save_row(generation.images, path)
        return [(path, " | ".join(prompts))]


def _save_row(images: torch.Tensor, path: Path) -> None:
    """[N,3,H,W] in [0,1] → one PNG with the images side by side."""
    from PIL import Image

    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    row = torch.cat(list(pixels), dim=2)  # [3,H,N*W]
    Image.fromarray(row.permute(1, 2, 0).cpu().numpy()).save(path)
