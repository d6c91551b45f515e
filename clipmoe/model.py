"""The CLIP model (Radford et al. 2021): a ViT image tower and a causal text transformer, whose
blocks take either a dense MLP or a sparse MoE layer (clipmoe.moe), chosen per block by the config.

Shapes: B batch, L sequence length, D tower width, H heads, P embedding width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, MoEConfig, TextConfig, VisionConfig
from .moe import MoE, MoEAux


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): what OpenAI's checkpoints were trained with (`-quickgelu` archs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D/H)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        return self.fc2(self.act(self.fc1(x))), None


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (CaiT, Touvron et al. 2021; open_clip's `ls_init_value`)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block. `mlp` is an Mlp or an MoE; both return (y, aux-or-None)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, ls_init_value: Optional[float] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = nn.Identity() if ls_init_value is None else LayerScale(dim, ls_init_value)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.ls2 = nn.Identity() if ls_init_value is None else LayerScale(dim, ls_init_value)

    def forward(self, x: torch.Tensor, causal: bool = False, token_mask: Optional[torch.Tensor] = None):
        x = x + self.ls1(self.attn(self.norm1(x), causal))
        y, aux = self.mlp(self.norm2(x), token_mask)
        return x + self.ls2(y), aux


def make_mlp(dim: int, mlp_ratio: float, moe: Optional[MoEConfig], act_layer, tower: str, block: int) -> nn.Module:
    if moe is None:
        return Mlp(dim, int(dim * mlp_ratio), act_layer)
    hidden = int(dim * (moe.expert_mlp_ratio or mlp_ratio))
    return MoE(dim, hidden, moe, act_layer, tower=tower, block=block)  # MoE builds its shared expert


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool, **kw):
    """x through the blocks; the MoE reports of those that have one. With `grad_checkpointing` (while autograd
    records), each block keeps only its input and recomputes its activations in the backward: the
    recomputation routes exactly as the forward did (same input, torch's RNG state restored for the jitter)."""
    aux = []
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x, a = checkpoint(blk, x, use_reentrant=False, **kw)
        else:
            x, a = blk(x, **kw)
        if a is not None:
            aux.append(a)
    return x, aux


def lock(groups: list[list], unlocked: int) -> None:
    """Freezes every parameter of `groups` (lists of modules and parameters, input side first), then unfreezes
    the last `unlocked` groups (LiT, Zhai et al. 2022; open_clip's grouping)."""
    def params(group):
        for item in group:
            yield from [item] if isinstance(item, nn.Parameter) else item.parameters()

    for i, group in enumerate(groups):
        for p in params(group):
            p.requires_grad = unlocked > 0 and i >= len(groups) - unlocked


def tower_groups(embed: list, blocks: nn.ModuleList, norm: nn.Module, proj: nn.Parameter) -> list[list]:
    """open_clip's lock groups: the embeddings, each block but the last, the last block with the final norm,
    the projection."""
    return [embed, *([b] for b in blocks[:-1]), [blocks[-1], norm], [proj]]


def build_blocks(cfg, act_layer, tower: str) -> nn.ModuleList:
    moe_at = set(cfg.moe.moe_blocks(cfg.depth)) if cfg.moe is not None else set()
    return nn.ModuleList(
        Block(cfg.width, cfg.num_heads,
              make_mlp(cfg.width, cfg.mlp_ratio, cfg.moe.for_block(i) if i in moe_at else None, act_layer, tower, i),
              cfg.ls_init_value)
        for i in range(cfg.depth))


def drop_patches(x: torch.Tensor, prob: float) -> torch.Tensor:
    """FLIP's patch dropout (Li et al. 2023), as open_clip's PatchDropout: each image keeps its class token (first)
    and a random max(1, int(N * (1 - prob))) of its N patch tokens (positions already added), drawn as open_clip
    draws them. Fewer tokens: a cheaper image tower in training, and fewer tokens for its MoE layers to route."""
    cls, patches = x[:, :1], x[:, 1:]
    keep = max(1, int(patches.shape[1] * (1 - prob)))
    idx = torch.randn(patches.shape[:2], device=x.device).topk(keep, dim=-1).indices
    return torch.cat([cls, patches[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]], dim=1)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, act_layer):
        super().__init__()
        self.patch_dropout = cfg.patch_dropout
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.blocks = build_blocks(cfg, act_layer, "image")
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[MoEAux]]:
        # a bf16 / float64 model takes float32 pixels (as OpenAI CLIP)
        images = images.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L-1, D)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        if self.training and self.patch_dropout:
            x = drop_patches(x, self.patch_dropout)
        x = self.norm_pre(x)
        x, aux = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x[:, 0]) @ self.proj, aux


class TextTower(nn.Module):
    """Causal transformer over CLIP BPE tokens, pooled at the end-of-text token (the largest id)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, act_layer):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = build_blocks(cfg, act_layer, "text")
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj, std=cfg.width ** -0.5)
        self.grad_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[MoEAux]]:
        eot_B = tokens.argmax(dim=-1)
        # With a causal mask nothing after the end token reaches it, so each batch runs only up to its
        # longest sequence: identical features, far less work for short prompts.
        length = int(eot_B.max()) + 1 if tokens.numel() else 1
        tokens = tokens[:, :length]
        mask_BL = torch.arange(length, device=tokens.device) <= eot_B.unsqueeze(1)  # padding is not routed
        x = self.token_embed(tokens) + self.pos_embed[:length]
        x, aux = run_blocks(self.blocks, x, self.grad_checkpointing, causal=True, token_mask=mask_BL)
        x = self.norm(x[torch.arange(x.shape[0], device=x.device), eot_B])
        return x @ self.proj, aux


@dataclass
class CLIPOutput:
    """What `CLIP.forward` returns, always: L2-normalised features, the exp'd scale and MoE reports."""

    image_features: Optional[torch.Tensor]  # (B, P); None when forward got no images (as in open_clip)
    text_features: Optional[torch.Tensor]  # (B, P); None when forward got no tokens
    logit_scale: torch.Tensor  # scalar, exp(log scale)
    aux: list[MoEAux] = field(default_factory=list)  # one per MoE layer, image tower first
    logit_bias: Optional[torch.Tensor] = None  # scalar, where the model has one (sigmoid loss)


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        self.image = VisionTower(cfg.vision, cfg.embed_dim, act_layer)
        self.text = TextTower(cfg.text, cfg.embed_dim, act_layer)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias  # SigLIP's learned bias, where configured
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))
        self.apply(_init_linear)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block in both towers (open_clip's method of the same name): training
        keeps each block's input only and recomputes the rest in the backward, trading about one more
        forward for much less activation memory. Same outputs and gradients."""
        self.image.grad_checkpointing = self.text.grad_checkpointing = enable

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freezes the image tower but its last `unlocked_groups` groups (open_clip's method and grouping:
        embeddings, each block, the last block with the final norm, the projection); LiT's locked image tower."""
        im = self.image
        lock(tower_groups([im.patch_embed, im.cls_token, im.pos_embed, im.norm_pre], im.blocks, im.norm, im.proj),
             unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freezes the text tower but its last `unlocked_layers` groups (open_clip's method and grouping)."""
        tx = self.text
        lock(tower_groups([tx.token_embed, tx.pos_embed], tx.blocks, tx.norm, tx.proj), unlocked_layers)

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features, _ = self.image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features, _ = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> CLIPOutput:
        """Either input may be None (open_clip's convention): that tower does not run, its features are None."""
        image_features, image_aux = self.image(images) if images is not None else (None, [])
        text_features, text_aux = self.text(tokens) if tokens is not None else (None, [])
        # the bias as a view, not the parameter itself: DDP (find_unused_parameters) walks the graph from the
        # outputs' grad_fns, and a bare parameter has none, so it would be taken as unused and then its gradient
        # would arrive "a second time" in backward
        bias = None if self.logit_bias is None else self.logit_bias.view(())
        image_features, text_features = (None if f is None else F.normalize(f, dim=-1)
                                          for f in (image_features, text_features))
        return CLIPOutput(image_features, text_features, self.logit_scale.exp(), image_aux + text_aux, bias)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
