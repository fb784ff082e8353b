"""Checkpoint interop: original LDM/SD files (.ckpt via weights_only, .safetensors), diffusers folders and
our own export (model.safetensors + config.json), for the U-Net (`unet_format`) and AutoencoderKL/VQModel
(`autoencoder_format`); what both share is in `common`. Files are read and written through `ldmscale.runs`.

Our modules use LDM's parameter names, so the LDM format is a prefix away; diffusers names are produced
by a prefix map generated from the model's own structure. Arbitrary pickles are never loaded.

An LDM/SD file carries no config: its structure is read from the original .yaml when given
(`original_config=`), else inferred from the weights. Head counts (and a few flags) leave no trace in the
weights, so inference refuses where they are not pinned by a known family instead of guessing."""

from ldmscale.models.interop.autoencoder_format import (
    STAGE1_EXPORT,
    autoencoder_config_from_diffusers,
    autoencoder_config_from_original,
    autoencoder_config_from_state_dict,
    autoencoder_config_to_diffusers,
    autoencoder_key_map,
    load_autoencoder,
    load_autoencoder_weights,
    save_autoencoder,
)
from ldmscale.models.interop.common import (
    AE_PREFIX,
    FORMATS,
    UNET_PREFIX,
    CheckpointMismatchError,
    read_original_config,
)
from ldmscale.models.interop.unet_format import (
    PINNED_HEADS,
    AmbiguousCheckpointError,
    load_unet,
    load_unet_weights,
    resolve_unet_config,
    save_unet,
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_key_map,
)

__all__ = [
    "AE_PREFIX", "FORMATS", "PINNED_HEADS", "STAGE1_EXPORT", "UNET_PREFIX", "AmbiguousCheckpointError",
    "CheckpointMismatchError", "autoencoder_config_from_diffusers", "autoencoder_config_from_original",
    "autoencoder_config_from_state_dict", "autoencoder_config_to_diffusers", "autoencoder_key_map",
    "load_autoencoder", "load_autoencoder_weights", "load_unet", "load_unet_weights", "read_original_config",
    "resolve_unet_config", "save_autoencoder", "save_unet", "unet_config_from_diffusers",
    "unet_config_from_original", "unet_config_from_state_dict", "unet_config_to_diffusers", "unet_key_map",
]
