"""The LDM/SD U-Net (Rombach et al. 2022, openaimodel.py design) and the stage-2 Denoiser around it.

Module names follow the original LDM/SD checkpoints (`model.diffusion_model.*`), so LDM files load with
an identity key map and `interop/unet_format.py` only has to translate diffusers names."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmscale.models.attention import BACKENDS, AttentionBlock, SpatialTransformer, xformers_available

if TYPE_CHECKING:
    from ldmscale.config import ConditionerConfig, UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps, cos first (as in LDM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whose output keeps the input dtype (LDM's GroupNorm32).

    torch's CPU and CUDA group_norm kernels already accumulate mean/var in float32 for bf16/fp16 inputs,
    so a same-dtype call needs no upcast: the old `x.float()` round trip cost two extra full passes over
    every activation in bf16. Under autocast group_norm runs in float32 and the cast restores x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # mixed dtypes outside autocast (e.g. float32 params, bf16 activations): compute in float32
            return F.group_norm(x.float(), self.num_groups, weight.float(), bias.float(), self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps).to(x.dtype)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (additive or scale-shift norm), optional up/down."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False, norm_num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(norm_num_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)  # the block starts as the identity
        nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(GroupNorm32(norm_num_groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        out_conv)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


def _per_level(values: list[int], num_levels: int, name: str) -> list[int]:
    values = list(values)
    if len(values) == 1:
        return values * num_levels
    if len(values) != num_levels:
        raise ValueError(f"model.{name} has {len(values)} values; expected 1 or one per level ({num_levels})")
    return values


ATTENTION_BLOCKS = ("transformer", "plain")


class UNet(nn.Module):
    """LDM U-Net: x [B,Cin,h,w], t [B], context [B,L,D], context_mask [B,L], y [B] | [B,adm] → [B,Cout,h,w].

    attention_block="transformer": SpatialTransformers of `transformer_depth` blocks (SD, LDM's
    cross-attention models). "plain": the original openaimodel AttentionBlock (LDM's unconditional and concat
    models), one wherever the depth is > 0, heads from num_heads/num_head_channels (num_heads_upsample: the
    decoder half's count when set, as in the original legacy mode), qkv head order legacy or
    use_new_attention_order. disable_self_attentions (per level) / disable_middle_self_attn: the
    transformer's first attention attends to the context too (SD x4 upscaler)."""

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: list[int] = (4, 2, 1), num_heads: int = -1, num_head_channels: int = 64,
                 transformer_depth: list[int] = (1,), transformer_depth_middle: Optional[int] = None,
                 context_dim: Optional[int] = None, use_linear_in_transformer: bool = False,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False, conv_resample: bool = True,
                 dropout: float = 0.0, num_classes: Optional[int] = None, adm_in_channels: Optional[int] = None,
                 norm_num_groups: int = 32, attention_backend: str = "sdpa", gradient_checkpointing: bool = False,
                 attention_block: str = "transformer", use_new_attention_order: bool = False,
                 num_heads_upsample: int = -1, disable_self_attentions: Optional[list[bool]] = None,
                 disable_middle_self_attn: bool = False):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("model.num_heads or model.num_head_channels must be set")
        if attention_block not in ATTENTION_BLOCKS:
            raise ValueError(f"model.attention_block={attention_block!r} is not one of {list(ATTENTION_BLOCKS)}")
        if attention_block == "plain" and context_dim is not None:
            raise ValueError("model.attention_block='plain' has no cross-attention: set model.context_dim=null")
        if disable_self_attentions is not None and len(disable_self_attentions) != len(channel_mult):
            raise ValueError(f"model.disable_self_attentions has {len(disable_self_attentions)} values; "
                             f"expected one per level ({len(channel_mult)})")
        if attention_backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={attention_backend!r} is not one of {list(BACKENDS)}")
        if attention_backend == "xformers" and not xformers_available():
            raise ValueError("model.attention_backend='xformers' but xformers is not installed")
        if num_classes is not None and adm_in_channels is not None:
            raise ValueError("set model.num_classes or model.adm_in_channels, not both")
        channel_mult = list(channel_mult)
        depth = _per_level(transformer_depth, len(channel_mult), "transformer_depth")
        depth_middle = transformer_depth_middle
        if depth_middle is None:  # the original always has middle attention with plain blocks
            depth_middle = 1 if attention_block == "plain" else depth[-1]
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.context_dim, self.num_classes, self.adm_in_channels = context_dim, num_classes, adm_in_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.attention_backend = attention_backend
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), num_heads=num_heads,
            num_head_channels=num_head_channels, transformer_depth=depth, transformer_depth_middle=depth_middle,
            context_dim=context_dim, use_linear_in_transformer=use_linear_in_transformer,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, conv_resample=conv_resample,
            dropout=dropout, num_classes=num_classes, adm_in_channels=adm_in_channels,
            norm_num_groups=norm_num_groups, attention_block=attention_block,
            use_new_attention_order=use_new_attention_order, num_heads_upsample=num_heads_upsample,
            disable_self_attentions=None if disable_self_attentions is None else list(disable_self_attentions),
            disable_middle_self_attn=disable_middle_self_attn)

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        elif adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        def attention(ch: int, level_depth: int, level: Optional[int] = None, up: bool = False) -> nn.Module:
            """The attention layer of a level (None: the middle block) in the original's head arithmetic."""
            if num_head_channels == -1:
                plain_up = up and attention_block == "plain" and num_heads_upsample != -1  # the original's rule
                heads = num_heads_upsample if plain_up else num_heads
            else:
                heads = ch // num_head_channels
            if attention_block == "plain":
                return AttentionBlock(ch, heads, use_new_attention_order, norm_num_groups, attention_backend)
            if level is None:
                no_self_attn = disable_middle_self_attn
            else:
                no_self_attn = bool(disable_self_attentions and disable_self_attentions[level])
            return SpatialTransformer(ch, heads, ch // heads, level_depth, context_dim, dropout,
                                      use_linear_in_transformer, norm_num_groups, attention_backend, no_self_attn)

        def resblock(ch: int, out: int, **kw: Any) -> ResBlock:
            return ResBlock(ch, emb_dim, dropout, out, use_scale_shift_norm, norm_num_groups=norm_num_groups, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3,
                                                                             padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and depth[level] > 0:
                    layers.append(attention(ch, depth[level], level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        middle: list[nn.Module] = [resblock(ch, ch)]
        if depth_middle > 0:
            middle.append(attention(ch, depth_middle))
        middle.append(resblock(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and depth[level] > 0:
                    layers.append(attention(ch, depth[level], level, up=True))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        out_conv = nn.Conv2d(model_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(GroupNorm32(norm_num_groups, ch), nn.SiLU(), out_conv)

    def set_attention_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={backend!r} is not one of {list(BACKENDS)}")
        if backend == "xformers" and not xformers_available():
            raise ValueError("model.attention_backend='xformers' but xformers is not installed")
        self.attention_backend = backend
        for module in self.modules():
            if isinstance(module, (SpatialTransformer, AttentionBlock)):
                module.set_backend(backend)

    def _run(self, block: TimestepEmbedSequential, h, emb, context, mask):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: works with torch.compile, kwargs and inputs that need no grad
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)
        return block(h, emb, context, mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))  # [B,4C]
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("this U-Net is class/vector conditioned: pass y")
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        if context is not None:
            context = context.to(dtype)
        # The mask is passed on as it is: dropping an all-True one would need its values on the host (a sync
        # per forward). Only cross-attention sees it; a caller without padding passes None for SDPA's flash path.
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # [B,Cout,h,w]


def unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """UNet constructor arguments from a `UNetConfig`."""
    disabled = cfg.disable_self_attentions
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        channel_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=list(cfg.attention_resolutions), num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, transformer_depth=list(cfg.transformer_depth),
        transformer_depth_middle=cfg.transformer_depth_middle, context_dim=cfg.context_dim,
        use_linear_in_transformer=cfg.use_linear_in_transformer, use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown, conv_resample=cfg.conv_resample, dropout=cfg.dropout,
        num_classes=cfg.num_classes, adm_in_channels=cfg.adm_in_channels, norm_num_groups=cfg.norm_num_groups,
        attention_backend=cfg.attention_backend, gradient_checkpointing=cfg.gradient_checkpointing,
        attention_block=cfg.attention_block, use_new_attention_order=cfg.use_new_attention_order,
        num_heads_upsample=cfg.num_heads_upsample, disable_self_attentions=None if disabled is None else list(disabled),
        disable_middle_self_attn=cfg.disable_middle_self_attn)


def compile_blocks(unet: UNet, backend: str = "inductor") -> UNet:
    """Regional compilation, in place: each input/middle/output block compiles on its own (blocks of one
    structure and shape share a graph), so compile time stays short and state_dict keys unprefixed.

    All blocks run one code object (TimestepEmbedSequential.forward) and Dynamo allows `recompile_limit`
    (8) specialisations per code object before it silently runs the rest eagerly: the limit is raised to
    8 per block (e.g. 8 aspect buckets)."""
    import torch._dynamo.config as dynamo_config

    blocks = (*unet.input_blocks, unet.middle_block, *unet.output_blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(blocks))
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * len(blocks))
    for block in blocks:
        block.compile(backend=backend)
    return unet


def _finish_unet(unet: UNet, cfg: UNetConfig) -> UNet:
    """What a UNetConfig asks for after construction: initial weights, memory format, compilation."""
    if cfg.weights:
        from ldmscale.models.interop import load_unet_weights

        load_unet_weights(unet, cfg.weights)
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_blocks(unet, cfg.compile_backend)
    return unet


def build_unet(cfg: UNetConfig) -> UNet:
    """Build the U-Net a `UNetConfig` describes (random init; `cfg.weights` loads trained weights)."""
    return _finish_unet(UNet(**unet_kwargs(cfg)), cfg)


class Denoiser(nn.Module):
    """The trained stage-2 network: U-Net + trainable conditioning parts (class embedding, layout encoder)."""

    def __init__(self, unet: UNet, kind: str = "none", layout_encoder: Optional[nn.Module] = None,
                 num_classes: Optional[int] = None, concat_channels: int = 0, layout_raster: bool = False,
                 conditioning: Any = None, modules: Optional[dict[str, nn.Module]] = None):
        """conditioning: the kind's `ldmscale.conditioning.Conditioning` (built from `kind` if None); it
        turns cond into the U-Net's inputs. modules: its trainable parts, registered under their names."""
        super().__init__()
        if conditioning is None:
            from ldmscale.conditioning import kind_named

            conditioning = kind_named(kind, num_classes=num_classes or 0, layout_raster=layout_raster)
        self.unet, self.kind, self.conditioning = unet, conditioning.name, conditioning
        if layout_encoder is not None:
            modules = {"layout_encoder": layout_encoder, **(modules or {})}
        for name, module in (modules or {}).items():
            self.add_module(name, module)
        self.num_classes = num_classes  # conditioning classes; the U-Net holds one more row (the null class)
        self.concat_channels = concat_channels

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        x_t, context, mask, y = self.conditioning.denoiser_inputs(self, x_t, cond or {})
        if self.unet.context_dim is not None and context is None:
            raise ValueError(f"the U-Net has context_dim={self.unet.context_dim}: cond['context'] is missing")
        return self.unet(x_t, t, context=context, context_mask=mask, y=y)


def concat_channels_for(model_cfg: UNetConfig, cond_cfg: ConditionerConfig) -> int:
    """Channels the caller concatenates onto x_t (cond["concat"]) for this conditioner (0: none)."""
    from ldmscale.conditioning import kind_for

    return kind_for(cond_cfg).concat_channels(model_cfg)


def build_denoiser(model_cfg: UNetConfig, cond_cfg: ConditionerConfig) -> Denoiser:
    """U-Net + the trainable conditioning parts of `cond_cfg`'s kind (widths checked against model.*)."""
    from ldmscale.conditioning import kind_for

    conditioning = kind_for(cond_cfg)
    kwargs = unet_kwargs(model_cfg)
    modules = conditioning.configure_unet(model_cfg, kwargs)
    unet = _finish_unet(UNet(**kwargs), model_cfg)  # model.compile compiles the U-Net that trains
    num_classes = kwargs["num_classes"] - 1 if kwargs.get("num_classes") else None
    return Denoiser(unet, conditioning.name, num_classes=num_classes,
                    concat_channels=conditioning.concat_channels(model_cfg), conditioning=conditioning,
                    modules=modules)
