"""Run metrics: W&B + RUN_DIR/metrics.jsonl + a tqdm bar on the main rank, no-ops elsewhere; img/s and MFU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ldmscale.config import LoggerConfig

# Dense bf16/fp16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins ("H100 PCIe" before "H100").
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 125e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
    ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]
CPU_PEAK_FLOPS = 1e12  # nominal: makes CPU MFU a readable relative figure, not a hardware claim


def detect_peak_flops(configured: float = 0.0) -> float:
    """Peak FLOP/s of one device: the configured value, else the GPU name table, else CPU_PEAK_FLOPS."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_FLOPS:
            if key in name:
                return flops
    return CPU_PEAK_FLOPS


def mfu(images_per_sec: float, flops_per_image_fwd: float, num_devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation; a training step costs 3× the forward (backward ≈ 2× forward)."""
    return 3.0 * flops_per_image_fwd * images_per_sec / max(1e-9, num_devices * peak_flops)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


class Throughput:
    """Wall time split into data wait and compute since the last report; counts images."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        out = {
            "images_per_sec": self.images / elapsed,
            "data_wait_frac": self.data_wait / elapsed,
            "step_time_s": elapsed / max(1, self.steps),
        }
        self.reset()
        return out


class NullLogger:
    """What non-main ranks get: every call does nothing, so the loop needs no rank checks."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_image(self, step: int, key: str, path: str | Path, caption: str = "") -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger(NullLogger):
    """Main-rank sinks: metrics.jsonl and RUN_DIR/train.log (always), W&B (offline/online/disabled), and
    on the console a tqdm bar on a terminal, else one plain line per logging step (a redirected log
    would otherwise fill with bar redraws)."""

    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, *, config: dict[str, Any] | None,
                 total_steps: int, initial_step: int = 0, name: str = "ldmscale"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.text = open(self.run_dir / "train.log", "a", buffering=1)  # beside Hydra's own lines, if any
        self.wandb_run = None
        if cfg.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.run_name or name, tags=list(cfg.tags),
                mode=cfg.wandb_mode, dir=str(self.run_dir), config=config, resume="allow",
                id=_wandb_id(self.run_dir),
            )
        self.bar = None
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=name, unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        line = f"step {step}/{self.total_steps} {_postfix(record)}"
        self.text.write(f"{_now()} {line}\n")
        if self.bar is not None:
            self.bar.set_postfix_str(_postfix(record), refresh=False)
        else:
            print(line, flush=True)

    def log_image(self, step: int, key: str, path: str | Path, caption: str = "") -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        self.text.write(f"{_now()} {message}\n")
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        self.jsonl.close()
        self.text.close()


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed job appends to the same run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item()
    return value


def _postfix(record: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("grad_norm", "gn", "{:.3f}"),
                            ("psnr", "psnr", "{:.2f}"), ("eval/psnr", "eval/psnr", "{:.2f}"),
                            ("eval/ssim", "eval/ssim", "{:.3f}"), ("epoch", "epoch", "{}"),
                            ("images_per_sec", "img/s", "{:.1f}"), ("mfu", "mfu", "{:.1%}"),
                            ("data_wait_frac", "data", "{:.0%}"), ("peak_mem_gb", "mem", "{:.1f}G")):
        if key in record and isinstance(record[key], (int, float)):
            parts.append(f"{label}={fmt.format(record[key])}")
    if not parts:  # e.g. evaluation-only records: show what there is
        parts = [f"{k}={v:.4g}" for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
    return " ".join(parts)


def build_logger(cfg: LoggerConfig, run_dir: str | Path, *, is_main: bool, config: dict[str, Any] | None,
                 total_steps: int, initial_step: int = 0, name: str = "ldmscale") -> NullLogger:
    if not is_main:
        return NullLogger()
    return MetricsLogger(cfg, run_dir, config=config, total_steps=total_steps, initial_step=initial_step,
                         name=name)
