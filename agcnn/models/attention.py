"""Attention blocks for the backbones, and the one factory that turns a name into a module.

Every block here starts as an exact identity, so inserting it into a pretrained network leaves
that network's outputs unchanged at step 0 (the timm ``non_local_attn`` habit of zero-initialising
the last layer):

* ``se``   -- Squeeze-and-Excitation (Hu et al. 2018), reduction 16, on each residual branch.
              The gate is ``2 * sigmoid(z)`` with ``z`` zero-initialised, so it is exactly 1 at
              start; the canonical ``sigmoid(z)`` gate can only approach 1. Same range of
              behaviour, a different constant.
* ``self`` -- local self-attention as in "Stand-Alone Self-Attention in Vision Models"
              (Ramachandran et al. 2019): a k x k window (k = 7) around each pixel, with relative
              row and column embeddings (half of each head's channels each). Added as a residual
              next to the 3x3 convolution of the last stage, with a zero-initialised output norm,
              rather than replacing that convolution, so ImageNet weights keep working.
* ``mhsa`` -- global multi-head self-attention over the whole feature map (BoTNet, Srinivas et
              al. 2021) with the same relative row/column embeddings, in the same place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agcnn.config import ATTENTION_KINDS, check_choice


class AttentionBlock(nn.Module):
    """Base of every attention block: a backbone's weights that no ImageNet file holds."""


@dataclass(frozen=True)
class AttentionLayer:
    """An attention kind: its constructor (``channels -> module``) and the attention point it fills.

    ``site`` names the backbone constructor argument (and the residual block's attribute):
    ``"channel_attn"`` on the residual branch of every block, before the addition, as in
    SE-ResNet; ``"spatial_attn"`` after the 3x3 convolution of the last stage, as SASA and
    BoTNet.
    """

    make: Callable[[int], AttentionBlock]
    site: str


def get_attention(kind: str) -> AttentionLayer | None:
    """The attention layer named ``kind`` (None for ``"none"``); the one place a name becomes a
    class. An unknown name raises a ConfigError listing the valid kinds."""
    check_choice("attention kind", kind, ATTENTION_KINDS)
    return None if kind == "none" else _LAYERS[kind]


def create_attention(kind: str, channels: int) -> nn.Module:
    """The attention module ``kind`` for a feature map with ``channels`` channels."""
    layer = get_attention(kind)
    return nn.Identity() if layer is None else layer.make(channels)


class SqueezeExcite(AttentionBlock):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        gate = 2.0 * torch.sigmoid(self.fc2(self.act(self.fc1(s))))
        return x * gate


class RelPosSelfAttention(AttentionBlock):
    """Multi-head self-attention with relative row/column embeddings, as a zero-start residual.

    ``window=k`` attends over the k x k neighbourhood of each pixel (SASA); ``window=None`` over
    the whole map (BoTNet MHSA). Logits are ``q . (k + r_row[dy] + r_col[dx])`` with the row
    embedding on the first half of each head's channels and the column one on the second half,
    as in SASA Sec. 3.1.
    """

    def __init__(self, channels: int, heads: int = 8, window: int | None = 7, max_offset: int = 64) -> None:
        super().__init__()
        if channels % heads or (channels // heads) % 2:
            raise ValueError(f"channels ({channels}) must split into {heads} heads of an even width")
        self.heads, self.window, self.max_offset = heads, window, max_offset
        self.head_dim = channels // heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        span = window if window is not None else 2 * max_offset - 1
        half = self.head_dim // 2
        self.rel_row = nn.Parameter(torch.randn(span, half) * half**-0.5)
        self.rel_col = nn.Parameter(torch.randn(span, half) * half**-0.5)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)  # exact identity at start

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q = q.reshape(b, self.heads, self.head_dim, h * w) * self.head_dim**-0.5
        out = self._local(q, k, v, h, w) if self.window else self._global(q, k, v, h, w)
        return x + self.norm(self.proj(out.reshape(b, c, h, w)))

    def _rel(self, offsets_y: Tensor, offsets_x: Tensor) -> Tensor:
        # [..., head_dim]: row embedding on the first half of the channels, column on the second.
        return torch.cat([self.rel_row[offsets_y], self.rel_col[offsets_x]], dim=-1)

    def _local(self, q: Tensor, k: Tensor, v: Tensor, h: int, w: int) -> Tensor:
        b, n = q.shape[0], self.window * self.window
        pad = self.window // 2
        # Neighbourhoods of every pixel: [b, heads, d, n, h*w]; zero padding is masked below.
        def windows(t: Tensor) -> Tensor:
            return F.unfold(t, self.window, padding=pad).reshape(b, self.heads, self.head_dim, n, h * w)
        kw, vw = windows(k), windows(v)
        inside = F.unfold(torch.ones(1, 1, h, w, device=q.device, dtype=q.dtype), self.window, padding=pad)
        offs = torch.arange(self.window, device=q.device)
        rel = self._rel(offs[:, None].expand(-1, self.window).reshape(-1), offs[None, :].expand(self.window, -1).reshape(-1))
        logits = torch.einsum("bhdp,bhdnp->bhnp", q, kw) + torch.einsum("bhdp,nd->bhnp", q, rel.to(q.dtype))
        logits = logits.masked_fill(inside.reshape(1, 1, n, h * w) == 0, float("-inf"))
        attn = logits.softmax(dim=2)
        return torch.einsum("bhnp,bhdnp->bhdp", attn, vw)

    def _global(self, q: Tensor, k: Tensor, v: Tensor, h: int, w: int) -> Tensor:
        if max(h, w) > self.max_offset:
            raise ValueError(f"feature map {h}x{w} exceeds the relative-position range {self.max_offset}")
        b = q.shape[0]
        k = k.reshape(b, self.heads, self.head_dim, h * w)
        v = v.reshape(b, self.heads, self.head_dim, h * w)
        ys, xs = torch.meshgrid(torch.arange(h, device=q.device), torch.arange(w, device=q.device), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        off = self.max_offset - 1
        rel = self._rel(ys[None, :] - ys[:, None] + off, xs[None, :] - xs[:, None] + off)  # [p, p', d]
        logits = torch.einsum("bhdp,bhdq->bhpq", q, k) + torch.einsum("bhdp,pqd->bhpq", q, rel.to(q.dtype))
        attn = logits.softmax(dim=-1)
        return torch.einsum("bhpq,bhdq->bhdp", attn, v)


_LAYERS: dict[str, AttentionLayer] = {
    "se": AttentionLayer(SqueezeExcite, "channel_attn"),
    "self": AttentionLayer(partial(RelPosSelfAttention, window=7), "spatial_attn"),
    "mhsa": AttentionLayer(partial(RelPosSelfAttention, window=None), "spatial_attn"),
}