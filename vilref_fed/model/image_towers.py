"""Image towers: images [B, 3, S, S] -> one feature vector per image [B, width].

Built from transformers classes (ViT, ResNet) or the efficientnet-lite package, never torchvision
or timm (those break with the pinned CPU torch). Each tower exposes `width`, the size of the vector
the projection reads (also the feature a linear probe uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vilref_fed.model.config import ModelConfig, VisionConfig
from vilref_fed.model.norms import batchnorm_to_groupnorm
from vilref_fed.model.pretrained import load_state_dict_file, resolve_image_weights


class ViTTower(nn.Module):
    """transformers ViTModel; the post-LayerNorm [CLS] token is the image feature (as CLIP)."""

    def __init__(self, v: VisionConfig, image_size: int, pretrained: bool) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if pretrained and v.pretrained:
            path = resolve_image_weights(v.pretrained)
            if path.is_dir():
                self.vit = ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
                _check_same(self.vit.config.hidden_size, v.hidden_size, "ViT hidden_size", path)
            else:
                self.vit = ViTModel(self._hf_config(ViTConfig, v, image_size), add_pooling_layer=False)
                self.vit.load_state_dict(load_state_dict_file(path))
        else:
            self.vit = ViTModel(self._hf_config(ViTConfig, v, image_size), add_pooling_layer=False)
        self.width = v.hidden_size

    @staticmethod
    def _hf_config(cls, v: VisionConfig, image_size: int):
        return cls(
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
            image_size=image_size,
            patch_size=v.patch_size,
            num_channels=3,
            hidden_dropout_prob=v.dropout,
            attention_probs_dropout_prob=v.dropout,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=images).last_hidden_state[:, 0]


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling for ResNets: the mean-pooled query attends over the feature map.

    Written with plain Linear layers (not nn.MultiheadAttention) so Opacus can compute per-sample
    gradients through it.
    """

    def __init__(self, spatial: int, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pooling: width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        b, n, c = x.shape
        h = self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, h, c // h).transpose(1, 2)
        k = self.k_proj(x).view(b, n, h, c // h).transpose(1, 2)
        v = self.v_proj(x).view(b, n, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, C/h]
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ResNetTower(nn.Module):
    """transformers ResNetModel (torchvision-equivalent ResNets), avg or attention pooled."""

    def __init__(self, v: VisionConfig, image_size: int, pretrained: bool) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        hf_cfg = ResNetConfig(
            depths=list(v.depths),
            hidden_sizes=list(v.hidden_sizes),
            embedding_size=v.embedding_size,
            layer_type=v.layer_type,
        )
        if pretrained and v.pretrained:
            path = resolve_image_weights(v.pretrained)
            if path.is_dir():
                self.resnet = ResNetModel.from_pretrained(str(path), local_files_only=True)
                _check_same(
                    list(self.resnet.config.hidden_sizes), list(v.hidden_sizes), "ResNet widths", path
                )
            else:
                self.resnet = ResNetModel(hf_cfg)
                self.resnet.load_state_dict(load_state_dict_file(path))
        else:
            self.resnet = ResNetModel(hf_cfg)
        if v.norm == "group":
            batchnorm_to_groupnorm(self.resnet, v.group_norm_groups)
        self.width = v.hidden_sizes[-1]
        if v.pool == "attention":
            reduction = 4 * 2 ** (len(v.depths) - 1)  # stem /4, then /2 per later stage
            self.pool: nn.Module | None = AttentionPool2d(
                _ceil_div(image_size, reduction), self.width, v.attention_pool_heads
            )
        elif v.pool in ("avg", "cls"):
            self.pool = None
        else:
            raise ValueError(f"unknown ResNet pooling {v.pool!r}; use 'avg' or 'attention'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.resnet(pixel_values=images).last_hidden_state
        if self.pool is None:
            return fmap.mean(dim=(2, 3))
        return self.pool(fmap)


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite (efficientnet-lite-pytorch), its classifier removed, average pooled."""

    def __init__(self, v: VisionConfig, image_size: int, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(
            v.variant, image_size=image_size, num_classes=1000, drop_connect_rate=v.drop_connect_rate
        )
        if pretrained and v.pretrained:
            path = resolve_image_weights(v.pretrained)
            net.load_state_dict(load_state_dict_file(path))
        # The ImageNet classifier is never used; leaving it would give DDP/Opacus unused parameters.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        if v.norm == "group":
            batchnorm_to_groupnorm(net, v.group_norm_groups)
        self.net = net
        self.width = net._conv_head.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))


def build_image_tower(cfg: ModelConfig, pretrained: bool = False) -> nn.Module:
    v = cfg.vision
    if v.type == "vit":
        return ViTTower(v, cfg.image_size, pretrained)
    if v.type == "resnet":
        return ResNetTower(v, cfg.image_size, pretrained)
    if v.type == "efficientnet-lite":
        return EfficientNetLiteTower(v, cfg.image_size, pretrained)
    if v.type in ("clip-vit", "clip-resnet"):
        from vilref_fed.model.clip_towers import build_clip_image_tower

        return build_clip_image_tower(cfg)
    raise ValueError(f"unknown image tower type {v.type!r}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_same(got, want, what: str, path) -> None:
    if got != want:
        raise ValueError(f"pretrained weights at {path} have {what} {got}, the model config says {want}")
