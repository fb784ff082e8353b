"""The latent scale and shift a job uses: one estimate, and one rule for where the values come from.

Stage 2 trains on `(latents - shift_factor) * scale_factor` (`models.autoencoder.scale_latents`), and
everything that decodes (the trainer's grids, `python -m ldmscale.sample`, exports) must undo exactly
that. So the values are decided once, when the config is built (`config.to_object`), and written into
`autoencoder.scale_factor/shift_factor`; config.json, the loader, the grids and the exports then all read
the same two numbers. The rule, first match wins:

1. `autoencoder.scale_factor` set explicitly (its shift too, default 0.0);
2. `data.use_manifest_scale=true`: the cache manifest's estimate over the cached data;
3. `autoencoder.weights` that carry a scale: a stage-1 run directory (RUN_DIR/latent_scale.json), our
   export folder or file (its config), a diffusers folder (`scaling_factor`/`shift_factor`);
4. 1.0 and 0.0 (identity).

The estimate (stage 1's latent_scale.json and the cache manifest alike) is `LatentStats.summary()`:
shift = the mean of all latent values, scale = 1 / their standard deviation around it, from the
posterior's exact moments (KL: E[z²] = mean² + var) — so scaled latents have zero mean and unit variance,
the data the noise schedule assumes (SD3/FLUX convention; LDM's KL-f8 fixed the shift at 0, which
leaves a non-zero mean in the data when the autoencoder's latents are not centred).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

SCALE_FILE = "latent_scale.json"  # RUN_DIR/latent_scale.json, written by the stage-1 run's export
STAGE1_EXPORT = "autoencoder"  # RUN_DIR/autoencoder: the stage-1 run's exported autoencoder


@dataclass(frozen=True)
class LatentScale:
    """A (scale, shift) pair and where it came from (for the run's report)."""

    scale_factor: float
    shift_factor: float
    source: str


def of_weights(path: Optional[str | Path]) -> Optional[LatentScale]:
    """The scale that autoencoder weights carry, or None (an LDM/SD .ckpt carries none). Reads only
    small JSON files and safetensors headers, never the weights."""
    if not path:
        return None
    path = Path(path)
    if (path / SCALE_FILE).is_file():  # a stage-1 run directory
        data = json.loads((path / SCALE_FILE).read_text())
        return LatentScale(float(data["scale_factor"]), float(data["shift_factor"]), str(path / SCALE_FILE))
    from ldmscale.runs import autoencoder_path

    path = autoencoder_path(path)  # a finished stage-1 run → its export; an unfinished one raises, saying so
    for folder in (path, path / "vae"):
        config_file = folder / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if config.get("ldmscale") == "autoencoder":  # our export folder
                inner = config["config"]
                return LatentScale(float(inner.get("scale_factor", 1.0)), float(inner.get("shift_factor", 0.0)),
                                   str(config_file))
            if config.get("_class_name") == "AutoencoderKL" and config.get("scaling_factor"):
                return LatentScale(float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0),
                                   str(config_file))
    if path.is_file() and path.suffix == ".safetensors":
        from ldmscale.runs import read_metadata

        metadata = read_metadata(path, what="autoencoder.weights")
        inner = json.loads(metadata.get("ldmscale_config", "{}")).get("autoencoder")
        if inner and "scale_factor" in inner:
            return LatentScale(float(inner["scale_factor"]), float(inner.get("shift_factor", 0.0)), str(path))
    return None


def of_manifest(train_shards: list[str]) -> LatentScale:
    """The first cache's manifest estimate (`data.use_manifest_scale=true`)."""
    from ldmscale.config import ConfigError

    if not train_shards:
        raise ConfigError("data.use_manifest_scale=true needs data.train_shards (a cache folder with manifest.json)")
    from ldmscale.data.loader import find_manifest

    where = find_manifest(train_shards[0])
    stats = json.loads(where.read_text()).get("latent_stats") or {}
    if "scale_factor" not in stats:
        raise ConfigError(f"data.use_manifest_scale=true, but {where} has no latent statistics "
                          f"(latent_stats.scale_factor); set autoencoder.scale_factor instead")
    return LatentScale(float(stats["scale_factor"]), float(stats["shift_factor"]), f"{where} (latent_stats)")


def decide(ae_cfg: Any, data_cfg: Any = None) -> LatentScale:
    """The rule in the module docstring, for an AutoencoderConfig (and the DataConfig, if any)."""
    if ae_cfg.scale_factor is not None:
        return LatentScale(float(ae_cfg.scale_factor), float(ae_cfg.shift_factor or 0.0), "autoencoder.scale_factor")
    if data_cfg is not None and data_cfg.use_manifest_scale:
        return of_manifest(list(data_cfg.train_shards))
    found = of_weights(ae_cfg.weights)
    if found is not None:
        return found
    return LatentScale(1.0, float(ae_cfg.shift_factor or 0.0), "default (no scale in the config or the weights)")


def resolved(ae_cfg: Any, data_cfg: Any = None) -> Any:
    """The AutoencoderConfig with concrete scale_factor/shift_factor (see `decide`)."""
    if ae_cfg.scale_factor is not None and ae_cfg.shift_factor is not None:
        return ae_cfg
    decided = decide(ae_cfg, data_cfg)
    return replace(ae_cfg, scale_factor=decided.scale_factor, shift_factor=decided.shift_factor)


def resolve(cfg: Any) -> Any:
    """In place: the Config's autoencoder section gets its concrete scale and shift; returns cfg."""
    cfg.autoencoder = resolved(cfg.autoencoder, cfg.data)
    return cfg


def report(ae_cfg: Any, data_cfg: Any = None) -> str:
    """One line for the run's log: the values used and whether the weights and the cache agree."""
    ae_cfg = resolved(ae_cfg, data_cfg)
    line = f"latent scale_factor={ae_cfg.scale_factor:.6g} shift_factor={ae_cfg.shift_factor:.6g}"
    notes = []
    for other in (of_weights(ae_cfg.weights), _manifest_or_none(data_cfg) if data_cfg is not None else None):
        if other is None:
            continue
        same = abs(other.scale_factor - ae_cfg.scale_factor) <= 1e-6 * abs(ae_cfg.scale_factor) \
            and abs(other.shift_factor - ae_cfg.shift_factor) <= 1e-6
        notes.append(("= " if same else "≠ ") + f"{other.source}: {other.scale_factor:.6g}/{other.shift_factor:.6g}")
    return line + (f" ({'; '.join(notes)})" if notes else " (no scale in the weights)")


def _manifest_or_none(data_cfg: Any) -> Optional[LatentScale]:
    if data_cfg.kind != "cached" or not data_cfg.train_shards:
        return None
    try:
        return of_manifest(list(data_cfg.train_shards))
    except Exception:  # a missing or unreadable cache is the loader's error to raise, with its own message
        return None


def describe_cache_estimate(stats: dict[str, Any], ae_cfg: Any) -> str:
    """The cache job's line: this data's estimate beside the scale its autoencoder carries."""
    return (f"latent std={stats['global_std']:.4f} mean={stats['global_mean']:.4f}: this data's estimate is "
            f"scale_factor={stats['scale_factor']:.5f} shift_factor={stats['shift_factor']:.5f} (stage 2 uses it "
            f"with data.use_manifest_scale=true); the autoencoder's {report(ae_cfg)}, which stage 2 uses with "
            "the same autoencoder.weights")
