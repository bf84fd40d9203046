"""Small hand-written models shared by the tests (transformers models are built from configs)."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's shape)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyTransformer(nn.Module):
    """Token classifier: embedding, ``depth`` blocks in a ModuleList run in a for loop, head.

    ``token_level=True`` returns ``[batch, seq, classes]`` logits instead of pooled ones.
    """

    def __init__(
        self,
        depth: int = 4,
        dim: int = 16,
        heads: int = 2,
        classes: int = 3,
        vocab: int = 50,
        dropout: float = 0.0,
        token_level: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.token_level = token_level

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids) + self.pos[:, : ids.shape[1]])
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(x if self.token_level else x.mean(1))


class IndexLoopModel(TinyTransformer):
    """Calls its blocks by index, ``self.layers[i](x)``, as some hand-written models do."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids) + self.pos[:, : ids.shape[1]])
        for i in range(len(self.layers)):
            x = self.layers[i](x)
        return self.head(self.norm(x).mean(1))


class TimmShapedViT(nn.Module):
    """A ViT laid out like timm's: ``patch_embed``, ``blocks`` (a Sequential), ``head``."""

    def __init__(self, depth: int = 4, dim: int = 16, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def torch_encoder_classifier(depth: int = 3, dim: int = 16, classes: int = 3) -> nn.Module:
    """``nn.TransformerEncoder`` (batch first) followed by a pooled linear head."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.head = nn.Linear(dim, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).mean(1))

    return Classifier()


def penalty_step(reg, forward, form: str):
    """``(clean_output, penalty)`` in either call form: ``"pair"``, or ``"call"`` (two calls)."""
    if form == "pair":
        return reg.pair(forward)
    clean = forward()
    return clean, reg(forward, clean)
