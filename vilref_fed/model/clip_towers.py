"""CLIP-architecture image towers, so the released ViLReF / Chinese-CLIP weights load exactly.

The released ViLReF checkpoints use OpenAI-CLIP image towers, which differ from the torchvision-style
towers of transformers' ViTModel / ResNetModel in ways no weight mapping can paper over:
- the ViT normalises the token sequence once more before the first block (`ln_pre`) and uses
  QuickGELU: transformers' CLIPVisionModel has exactly that (pre_layrnorm, quick_gelu, bias-free
  patch convolution, post-LayerNorm on the class token), so "clip-vit" wraps it;
- the "ModifiedResNet" has a three-convolution stem with average pooling, anti-aliased strides
  (average pooling before the strided 1x1 path) and a QKV attention pooling with its own output
  projection. No transformers class has that, so "clip-resnet" is written here in plain torch.

Both towers follow the image-tower protocol of image_towers.py (`width`, images -> [B, width]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vilref_fed.model.config import ModelConfig
from vilref_fed.model.norms import batchnorm_to_groupnorm


class ClipViTTower(nn.Module):
    """transformers CLIPVisionModel; the feature is post_layernorm(class token), as CLIP's ln_post."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        v = cfg.vision
        self.clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads,
                image_size=cfg.image_size,
                patch_size=v.patch_size,
                num_channels=3,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                attention_dropout=v.dropout,
            )
        )
        self.width = v.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=images).pooler_output


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool if strided) -> 1x1, expansion 4; shortcut = avg-pool -> 1x1 -> BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(inplanes, out, 1, bias=False),
                nn.BatchNorm2d(out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.pool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class _AttentionPool(nn.Module):
    """Multi-head attention of the mean token over [mean; all positions], then an output projection."""

    def __init__(self, spatial: int, width: int, heads: int, out_dim: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pooling width {width} is not divisible by {heads} heads")
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)
        self.heads = heads

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c = fmap.shape[:2]
        x = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"attention pooling expects a {math.isqrt(self.positional_embedding.shape[0] - 1)}^2 "
                f"feature map (the configured image size), got {fmap.shape[2]}x{fmap.shape[3]}"
            )
        x = x + self.positional_embedding.to(x.dtype)
        hd = c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, self.heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, hd]
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ClipResNetTower(nn.Module):
    """CLIP's ModifiedResNet. `vision.embedding_size` is the stem width (64 for RN50), `depths` the
    blocks per stage, `attention_pool_heads` the pooling heads; the pooled feature has `embed_dim`
    channels (CLIP's attention pooling ends in its own projection), so `width == embed_dim`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.vision
        w = int(v.embedding_size)
        self.stem_conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.stem_bn1 = nn.BatchNorm2d(w // 2)
        self.stem_conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.stem_bn2 = nn.BatchNorm2d(w // 2)
        self.stem_conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.stem_bn3 = nn.BatchNorm2d(w)
        self.stem_pool = nn.AvgPool2d(2)
        stages = []
        inplanes = w
        for i, blocks in enumerate(v.depths):
            planes = w * 2**i
            layer = [_Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * _Bottleneck.expansion
            layer += [_Bottleneck(inplanes, planes, stride=1) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*layer))
        self.stages = nn.ModuleList(stages)
        reduction = 4 * 2 ** (len(v.depths) - 1)  # stem /4, then /2 per later stage
        self.attnpool = _AttentionPool(
            cfg.image_size // reduction, inplanes, v.attention_pool_heads, cfg.embed_dim
        )
        if v.norm == "group":
            batchnorm_to_groupnorm(self, v.group_norm_groups)
        self.width = cfg.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn1(self.stem_conv1(images)))
        x = F.relu(self.stem_bn2(self.stem_conv2(x)))
        x = self.stem_pool(F.relu(self.stem_bn3(self.stem_conv3(x))))
        for stage in self.stages:
            x = stage(x)
        return self.attnpool(x)


def build_clip_image_tower(cfg: ModelConfig) -> nn.Module:
    """The tower for vision types "clip-vit" and "clip-resnet" (pretrained weights come by import)."""
    if cfg.vision.type == "clip-vit":
        return ClipViTTower(cfg)
    if cfg.vision.type == "clip-resnet":
        return ClipResNetTower(cfg)
    raise ValueError(f"not a CLIP image tower type: {cfg.vision.type!r}")
