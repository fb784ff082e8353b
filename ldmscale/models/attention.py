"""Multi-head (cross-)attention, the SpatialTransformer of the LDM U-Net and the original plain AttentionBlock;
backends sdpa | xformers | math.

Parameter names match both the original LDM/SD code and diffusers' Transformer2DModel, so the
transformer blocks of either checkpoint format load without renaming inside a block."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BACKENDS = ("sdpa", "xformers", "math")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q [B,H,Lq,d], k/v [B,H,Lk,d], mask [B,Lk] bool (True = attend) → [B,H,Lq,d]."""
    if backend == "sdpa":
        attn_mask = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if backend == "math":
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B,H,Lq,Lk]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.float().softmax(dim=-1).to(v.dtype) @ v
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if mask is not None:
            b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            # xformers wants the bias' last dim padded to a multiple of 8
            padded = (lk + 7) // 8 * 8
            full = q.new_zeros(b, h, lq, padded)
            full[..., :lk] = torch.zeros(b, 1, 1, lk, dtype=q.dtype, device=q.device).masked_fill(
                ~mask[:, None, None, :], float("-inf"))
            bias = full[..., :lk]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    raise ValueError(f"model.attention_backend={backend!r} is not one of {list(BACKENDS)}")


class CrossAttention(nn.Module):
    """Multi-head attention of queries from x over keys/values from `context` (x itself when None)."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.backend = heads, backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, lq, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B,H,L,d]
        out = attention(q, k, v, mask, self.backend)  # [B,H,Lq,d]
        return self.to_out(out.transpose(1, 2).reshape(b, lq, -1))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), the feed-forward of SD's transformer blocks."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention → cross-attention → GEGLU feed-forward, each residual.

    disable_self_attn (SD x4 upscaler): the first attention also attends to the context instead of x."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None,
                 dropout: float = 0.0, backend: str = "sdpa", disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, backend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = mask if context is not None else None
        if self.disable_self_attn:
            x = x + self.attn1(self.norm1(x), context, mask)
        else:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map → tokens → `depth` transformer blocks → feature map, residual (LDM sec. 3.3)."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: Optional[int] = None,
                 dropout: float = 0.0, use_linear: bool = False, norm_num_groups: int = 32, backend: str = "sdpa",
                 disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, backend, disable_self_attn)
            for _ in range(depth))
        proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(proj_out.weight)  # zero-init: each block starts as the identity (as in LDM)
        nn.init.zeros_(proj_out.bias)
        self.proj_out = proj_out
        self.gradient_checkpointing = False

    def set_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.backend = backend

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # [B,HW,inner]
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, mask, use_reentrant=False)
            else:
                x = block(x, context, mask)
        if self.use_linear:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        # x_in first: the sum takes x_in's memory format (NCHW stays NCHW, channels_last stays channels_last)
        # instead of the token layout's NHWC strides leaking into every later GroupNorm/conv
        return x_in + x


class AttentionBlock(nn.Module):
    """The original LDM/ADM plain spatial self-attention (openaimodel.AttentionBlock): GroupNorm → one 1x1 qkv
    projection → `heads` heads → 1x1 proj_out, residual. No context. The head layout of the qkv channels
    follows the original: legacy order (QKVAttentionLegacy, LDM's default) splits heads before q/k/v,
    [h0: q k v | h1: q k v | ...]; new order (QKVAttention, use_new_attention_order) splits q/k/v first,
    [q: h0 h1 ... | k: ... | v: ...]. The order is not visible in the weights: only a config tells."""

    def __init__(self, channels: int, heads: int, new_order: bool = False, norm_num_groups: int = 32,
                 backend: str = "sdpa"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot have {heads} heads")
        self.heads, self.new_order, self.backend = heads, new_order, backend
        self.norm = nn.GroupNorm(norm_num_groups, channels)  # the original's normalization(): eps 1e-5
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero_module in the original: starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def set_backend(self, backend: str) -> None:
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))  # [B,3C,HW]
        layout = (b, 3, self.heads, -1, h * w) if self.new_order else (b, self.heads, 3, -1, h * w)
        qkv = qkv.reshape(layout)
        q, k, v = (qkv[:, i] if self.new_order else qkv[:, :, i] for i in range(3))  # [B,H,d,HW]
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), None, self.backend)
        out = self.proj_out(out.transpose(-1, -2).reshape(b, c, h * w))  # heads back to channels, head-major
        return (flat + out).reshape(b, c, h, w)
