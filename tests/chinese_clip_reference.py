"""A minimal, independent re-creation of the Chinese-CLIP / ViLReF module layout (for tests only).

The released ViLReF checkpoints are Chinese-CLIP checkpoints (github.com/T6Yang/ViLReF, built on
github.com/OFA-Sys/Chinese-CLIP `cn_clip/clip/model.py`). We cannot download them, so the importer is
verified against a randomly initialised model that has *their* parameter names, shapes and forward
computation, saved the way their trainer saves it ({"epoch", "step", "name", "state_dict":
{"module.<key>": tensor}, "optimizer"}). Written from the architecture description, not copied:

- image tower `visual.*`: ViT (conv1 without bias, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.N.{attn = nn.MultiheadAttention (in_proj_weight/bias, out_proj),
  ln_1, mlp.c_fc, QuickGELU, mlp.c_proj, ln_2}, ln_post on the class token, proj [width, embed]) or the
  "ModifiedResNet" (3-conv stem + avgpool, anti-aliased Bottlenecks with downsample."0"/."1",
  attnpool with a positional embedding and q/k/v/c_proj);
- text tower `bert.*`: a BERT (embeddings word/position/token_type + LayerNorm; encoder.layer.N with
  attention.self.{query,key,value}, attention.output.{dense,LayerNorm}, intermediate.dense,
  output.{dense,LayerNorm}; erf GELU; additive -10000 mask; no pooler), `text_projection` [hidden,
  embed] applied to the [CLS] hidden state; `logit_scale` = log(1/tau).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(
        self, resolution: int, patch: int, width: int, layers: int, heads: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).transpose(0, 1)  # sequence-first, as nn.MultiheadAttention defaults to
        x = self.transformer(x).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * 4)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    def __init__(self, spatial: int, dim: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None, :]
        # Attention of the mean token (query) over all tokens, written out explicitly.
        q = self.q_proj(x[:1])
        k, v = self.k_proj(x), self.v_proj(x)
        hd = c // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # [L, N, C] -> [N, heads, L, hd]
            return t.reshape(t.shape[0], n, self.heads, hd).permute(1, 2, 0, 3)

        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
        out = (att @ split(v)).permute(0, 2, 1, 3).reshape(n, c)
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    def __init__(
        self, layers: tuple[int, int, int, int], embed_dim: int, heads: int, resolution: int, width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._stage(width, layers[0])
        self.layer2 = self._stage(width * 2, layers[1], stride=2)
        self.layer3 = self._stage(width * 4, layers[2], stride=2)
        self.layer4 = self._stage(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, embed_dim)

    def _stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class _Dense(nn.Module):
    """`dense` + `LayerNorm` (+ residual): BERT's attention.output and output blocks."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.heads = heads

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        hd = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, hd).transpose(1, 2)

        scores = split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / math.sqrt(hd) + mask_add
        return (torch.softmax(scores, dim=-1) @ split(self.value(x))).transpose(1, 2).reshape(n, length, d)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _Dense(hidden, hidden, eps)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inter)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _Dense(inter, hidden, eps)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        a = self.attention.output(self.attention.self(x, mask_add), x)
        h = F.gelu(self.intermediate.dense(a))  # erf GELU
        return self.output(h, a)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, type_vocab: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        e = (
            self.word_embeddings(ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(torch.zeros_like(ids))
        )
        return self.LayerNorm(e)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(hidden, heads, inter, eps) for _ in range(layers)])


class Bert(nn.Module):
    def __init__(
        self, vocab: int, hidden: int, layers: int, heads: int, inter: int, max_pos: int, type_vocab: int
    ) -> None:
        super().__init__()
        eps = 1e-12
        self.embeddings = _Embeddings(vocab, hidden, max_pos, type_vocab, eps)
        self.encoder = _Encoder(layers, hidden, heads, inter, eps)
        for m in self.modules():  # BERT's initialisation: N(0, 0.02), zero biases, unit LayerNorm
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask_add = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_add)
        return x


class ChineseCLIPReference(nn.Module):
    """The dual encoder with Chinese-CLIP's parameter names; `encode_*` return unnormalised embeddings."""

    def __init__(
        self,
        embed_dim: int = 512,
        image_resolution: int = 224,
        vision_layers: int | tuple[int, int, int, int] = 12,
        vision_width: int = 768,
        vision_patch_size: int | None = 16,
        vocab_size: int = 21128,
        text_hidden_size: int = 768,
        text_num_hidden_layers: int = 12,
        text_num_attention_heads: int = 12,
        text_intermediate_size: int = 3072,
        text_max_position_embeddings: int = 512,
        text_type_vocab_size: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(vision_layers, (tuple, list)):
            self.visual: nn.Module = ModifiedResNet(
                tuple(vision_layers), embed_dim, vision_width * 32 // 64, image_resolution, vision_width
            )
        else:
            self.visual = VisualTransformer(
                image_resolution,
                int(vision_patch_size),
                vision_width,
                vision_layers,
                vision_width // 64,
                embed_dim,
            )
        self.bert = Bert(
            vocab_size,
            text_hidden_size,
            text_num_hidden_layers,
            text_num_attention_heads,
            text_intermediate_size,
            text_max_position_embeddings,
            text_type_vocab_size,
        )
        self.text_projection = nn.Parameter(torch.randn(text_hidden_size, embed_dim) * text_hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids.ne(0)  # [PAD] is id 0 in the Chinese BERT vocabulary
        return self.bert(input_ids, mask)[:, 0] @ self.text_projection


def save_like_chinese_clip(
    model: ChineseCLIPReference, path, ddp_prefix: bool = True, flash_layout: bool = False
) -> None:
    """Write `model` the way their trainer does: a dict with a DDP-prefixed `state_dict`.

    `flash_layout=True` writes the layout their FlashAttention option produces (fused Wqkv names),
    which their own `convert_state_dict` also reads.
    """
    sd = {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    if flash_layout:
        sd = _to_flash_layout(sd)
    prefix = "module." if ddp_prefix else ""
    torch.save(
        {
            "epoch": 20,
            "step": 1234,
            "name": "reference",
            "state_dict": {prefix + k: v for k, v in sd.items()},
            "optimizer": {},
        },
        path,
    )


def _to_flash_layout(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if ".attn.in_proj_weight" in k:
            out[k.replace("attn.in_proj_weight", "attn.Wqkv.weight")] = v
        elif ".attn.in_proj_bias" in k:
            out[k.replace("attn.in_proj_bias", "attn.Wqkv.bias")] = v
        else:
            out[k] = v
    i = 0
    while f"bert.encoder.layer.{i}.attention.self.query.weight" in out:
        p = f"bert.encoder.layer.{i}.attention"
        for kind in ("weight", "bias"):
            out[f"{p}.self.Wqkv.{kind}"] = torch.cat(
                [out.pop(f"{p}.self.{n}.{kind}") for n in ("query", "key", "value")]
            )
            out[f"{p}.self.out_proj.{kind}"] = out.pop(f"{p}.output.dense.{kind}")
        i += 1
    return out
