"""Import the checkpoints released with the ViLReF paper (Chinese-CLIP format) as vilref-fed models.

The paper's weights (ViLReF_ViT.pt, ViLReF_RN50) were trained with the Chinese-CLIP code base, so a
hospital that wants to screen with the published model needs their parameter names mapped onto our
towers. Their file is `torch.save({"epoch", "step", "name", "state_dict", "optimizer"})` with the
state dict keys prefixed by "module." (DDP); the FlashAttention option fuses attention weights into
`Wqkv`. Keys (github.com/OFA-Sys/Chinese-CLIP, cn_clip/clip/model.py, and T6Yang/ViLReF):

- `visual.*` ViT: conv1.weight (bias-free patch conv), class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.N.{attn.in_proj_weight/bias (q;k;v stacked), attn.out_proj, ln_1,
  mlp.c_fc, mlp.c_proj, ln_2}, ln_post, proj [width, embed] (used as x @ proj);
- `visual.*` ModifiedResNet (RN50): conv1..3/bn1..3 stem, layerS.B.{conv1..3, bn1..3,
  downsample.0 (conv), downsample.1 (BN)}, attnpool.{positional_embedding, q/k/v/c_proj};
- `bert.*` RoBERTa-wwm-ext-base-chinese in BERT layout (same names as transformers' BertModel; the
  pooler is unused and dropped), `text_projection` [hidden, embed] on the [CLS] state;
- `logit_scale` = theta = log(1/tau), the same parameterisation as ours.

The image tower becomes a "clip-vit" / "clip-resnet" tower (vilref_fed/model/clip_towers.py), the
text tower our BERT tower, and the projections our bias-free linear layers (their matrices
transposed; for the ResNet, whose attention pooling already projects, `image_proj` is the
identity). Every source tensor must land somewhere and every target tensor must be filled, or the
import fails: a silently half-loaded model would screen with random weights.

Attention heads cannot be read off the weights: like Chinese-CLIP's own configs, the importer assumes
64-dimensional heads (ViT-B/16: 12, RN50 pooling: 32, BERT-base: 12), which holds for every
Chinese-CLIP model except ViT-H-14 (80-dimensional heads), which ViLReF does not use.

Tokenizer vocabulary: the released models use the 21,128-token Chinese BERT WordPiece vocabulary
(`vocab.txt` in Chinese-CLIP's cn_clip/clip/ and in ViLReF/clip/). It is the file vendored at
vilref_fed/model/vocab/bert_chinese_vocab.txt, used by default; a site holding its own copy can pass
it with `--vocab PATH/vocab.txt` (its line count must equal the checkpoint's embedding rows).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vilref_fed.model.config import CLIP_MEAN, CLIP_STD

_RESBLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_RN_LAYER = re.compile(r"^visual\.layer(\d+)\.(\d+)\.(.+)$")
_BERT_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


class ChineseClipImportError(ValueError):
    """The file is not a Chinese-CLIP checkpoint we can map (the message says what is wrong)."""


@dataclass(frozen=True)
class ChineseClipLayout:
    """Architecture read off the tensors of a Chinese-CLIP state dict (no config file needed)."""

    vision: str  # "vit" or "resnet"
    embed_dim: int
    image_size: int
    vision_width: int
    vision_layers: tuple[int, ...]  # (n,) for a ViT, blocks per stage for a ResNet
    vision_heads: int
    patch_size: int | None
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int
    max_positions: int


def read_chinese_clip_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict without the DDP prefix, the bert pooler and FlashAttention fusion; info dict).

    Loaded with weights_only=True: a model file from elsewhere must not be able to run code here.
    """
    path = Path(path)
    if not path.is_file():
        raise ChineseClipImportError(f"{path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChineseClipImportError(
            f"{path} could not be read as a PyTorch checkpoint with plain tensors ({type(exc).__name__}); "
            "give the .pt file released with the paper"
        ) from None
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        info = {k: obj[k] for k in ("epoch", "step", "name") if k in obj and isinstance(obj[k], (int, str))}
        sd = obj["state_dict"]
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not sd:
        raise ChineseClipImportError(f"{path} holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("bert.pooler.") or key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    out = _unfuse_flash_attention(out)
    if "visual.conv1.weight" not in out or "text_projection" not in out:
        raise ChineseClipImportError(
            f"{path} is not a Chinese-CLIP / ViLReF checkpoint (no visual.conv1.weight or text_projection)"
        )
    return out, info


def _unfuse_flash_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their FlashAttention layout back to the standard one (Wqkv -> in_proj / query,key,value)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".attn.Wqkv." in key:
            out[key.replace(".attn.Wqkv.", ".attn.in_proj_")] = value
        elif ".attention.self.Wqkv." in key:
            prefix, kind = key.split(".attention.self.Wqkv.")
            for name, part in zip(("query", "key", "value"), torch.chunk(value, 3, dim=0), strict=True):
                out[f"{prefix}.attention.self.{name}.{kind}"] = part
        elif ".attention.self.out_proj." in key:
            prefix, kind = key.split(".attention.self.out_proj.")
            out[f"{prefix}.attention.output.dense.{kind}"] = value
        else:
            out[key] = value
    return out


def infer_layout(sd: Mapping[str, torch.Tensor]) -> ChineseClipLayout:
    """Read dimensions from tensor shapes, as Chinese-CLIP's own loader trusts its config files."""
    embed_dim = int(sd["text_projection"].shape[1])
    text_hidden = int(sd["text_projection"].shape[0])
    vocab_size, hidden = (int(x) for x in sd["bert.embeddings.word_embeddings.weight"].shape)
    if hidden != text_hidden:
        raise ChineseClipImportError(
            f"text_projection expects {text_hidden}-d text features, BERT is {hidden}-d"
        )
    text_layers = 1 + max(int(m.group(1)) for k in sd if (m := _BERT_LAYER.match(k)))
    text_intermediate = int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0])
    max_positions = int(sd["bert.embeddings.position_embeddings.weight"].shape[0])
    # Chinese-CLIP's BERT configs use 64-dimensional heads (base: 12 x 64, large: 16 x 64, RBT3: 12 x 64).
    text_heads = max(1, text_hidden // 64)
    if "visual.proj" in sd:
        width, out_dim = (int(x) for x in sd["visual.proj"].shape)
        patch = int(sd["visual.conv1.weight"].shape[-1])
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        layers = 1 + max(int(m.group(1)) for k in sd if (m := _RESBLOCK.match(k)))
        vision = "vit"
        vision_layers: tuple[int, ...] = (layers,)
        heads = width // 64
        image_size = grid * patch
    elif "visual.attnpool.c_proj.weight" in sd:
        stem = int(sd["visual.conv1.weight"].shape[0])
        width = stem * 2
        out_dim = int(sd["visual.attnpool.c_proj.weight"].shape[0])
        counts: dict[int, int] = {}
        for k in sd:
            if m := _RN_LAYER.match(k):
                stage, block = int(m.group(1)), int(m.group(2))
                counts[stage] = max(counts.get(stage, 0), block + 1)
        vision_layers = tuple(counts[s] for s in sorted(counts))
        spatial = int(round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
        image_size = spatial * 32
        heads = width * 32 // 64
        patch = None
        vision = "resnet"
    else:
        raise ChineseClipImportError(
            "unrecognised image tower: neither a ViT (visual.proj) nor a ModifiedResNet (visual.attnpool)"
        )
    if out_dim != embed_dim:
        raise ChineseClipImportError(
            f"image tower projects to {out_dim} dimensions, the text tower to {embed_dim}"
        )
    return ChineseClipLayout(
        vision=vision,
        embed_dim=embed_dim,
        image_size=image_size,
        vision_width=width,
        vision_layers=vision_layers,
        vision_heads=heads,
        patch_size=patch,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        text_intermediate=text_intermediate,
        vocab_size=vocab_size,
        max_positions=max_positions,
    )


def model_config_for(
    layout: ChineseClipLayout, context_length: int = 100, vocab: str = "bert-chinese", name: str | None = None
) -> dict[str, Any]:
    """Our model config (a dict for `build_model`) with exactly the released architecture."""
    if layout.vision == "vit":
        vision: dict[str, Any] = {
            "type": "clip-vit",
            "hidden_size": layout.vision_width,
            "num_hidden_layers": layout.vision_layers[0],
            "num_attention_heads": layout.vision_heads,
            "intermediate_size": 4 * layout.vision_width,
            "patch_size": layout.patch_size,
            "pool": "cls",
            "dropout": 0.0,
        }
        default_name = f"vilref-import-vit-{layout.vision_width}-p{layout.patch_size}"
    else:
        vision = {
            "type": "clip-resnet",
            "depths": list(layout.vision_layers),
            "embedding_size": layout.vision_width,
            "attention_pool_heads": layout.vision_heads,
            "pool": "attention",
            "norm": "batch",
        }
        default_name = f"vilref-import-rn{sum(layout.vision_layers) * 3 + 2}"
    return {
        "name": name or default_name,
        "description": "Imported from a Chinese-CLIP checkpoint (the ViLReF paper's released weights).",
        "embed_dim": layout.embed_dim,
        "image_size": layout.image_size,
        "context_length": min(int(context_length), layout.max_positions),
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "vision": vision,
        "text": {
            "type": "bert",
            "vocab": vocab,
            "vocab_size": layout.vocab_size,
            "hidden_size": layout.text_hidden,
            "num_hidden_layers": layout.text_layers,
            "num_attention_heads": layout.text_heads,
            "intermediate_size": layout.text_intermediate,
            "max_position_embeddings": layout.max_positions,
            "dropout": 0.0,
            "pooling": "cls",
        },
    }


def _vit_key(rest: str, layer: int) -> list[tuple[str, slice | None]]:
    """Targets (relative to the CLIPVisionModel) of one resblock tensor; in_proj splits into q, k, v."""
    base = f"encoder.layers.{layer}."
    if rest.startswith("attn.in_proj_"):
        kind = "weight" if rest.endswith("weight") else "bias"
        return [(f"{base}self_attn.{n}_proj.{kind}", i) for i, n in enumerate(("q", "k", "v"))]  # type: ignore[misc]
    table = {
        "attn.out_proj.": "self_attn.out_proj.",
        "ln_1.": "layer_norm1.",
        "ln_2.": "layer_norm2.",
        "mlp.c_fc.": "mlp.fc1.",
        "mlp.c_proj.": "mlp.fc2.",
    }
    for src, dst in table.items():
        if rest.startswith(src):
            return [(base + dst + rest[len(src) :], None)]
    raise ChineseClipImportError(f"unexpected ViT block tensor 'visual.transformer.resblocks.{layer}.{rest}'")


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: ChineseClipLayout) -> dict[str, torch.Tensor]:
    """Their keys -> our ViLReFModel state-dict keys (float32), every source tensor accounted for."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.detach().to(torch.float32).contiguous().clone()

    for key, value in sd.items():
        if key.startswith("bert."):
            put("text_tower." + key, value)
        elif key == "text_projection":
            put("text_proj.weight", value.t())
        elif key == "logit_scale":
            put("logit_scale", value.reshape(()))
        elif key.startswith("visual.") and layout.vision == "vit":
            _convert_vit(key, value, put)
        elif key.startswith("visual.") and layout.vision == "resnet":
            _convert_resnet(key, value, put)
        else:
            raise ChineseClipImportError(
                f"unexpected tensor '{key}' in the checkpoint; is this a Chinese-CLIP model?"
            )
    if layout.vision == "resnet":
        put("image_proj.weight", torch.eye(layout.embed_dim))
    return out


def _convert_vit(key: str, value: torch.Tensor, put) -> None:
    p = "image_tower.clip."
    direct = {
        "visual.conv1.weight": "embeddings.patch_embedding.weight",
        "visual.class_embedding": "embeddings.class_embedding",
        "visual.positional_embedding": "embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "pre_layrnorm.weight",
        "visual.ln_pre.bias": "pre_layrnorm.bias",
        "visual.ln_post.weight": "post_layernorm.weight",
        "visual.ln_post.bias": "post_layernorm.bias",
    }
    if key in direct:
        put(p + direct[key], value)
    elif key == "visual.proj":
        put("image_proj.weight", value.t())
    elif m := _RESBLOCK.match(key):
        targets = _vit_key(m.group(2), int(m.group(1)))
        if len(targets) == 1:
            put(p + targets[0][0], value)
        else:
            for (target, _), part in zip(targets, torch.chunk(value, 3, dim=0), strict=True):
                put(p + target, part)
    else:
        raise ChineseClipImportError(f"unexpected ViT tensor '{key}'")


def _convert_resnet(key: str, value: torch.Tensor, put) -> None:
    p = "image_tower."
    if m := re.match(r"^visual\.(conv|bn)([123])\.(.+)$", key):
        put(f"{p}stem_{m.group(1)}{m.group(2)}.{m.group(3)}", value)
    elif m := _RN_LAYER.match(key):
        stage, block, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
        rest = re.sub(r"^downsample\.0\.", "shortcut.1.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.2.", rest)
        put(f"{p}stages.{stage}.{block}.{rest}", value)
    elif key.startswith("visual.attnpool."):
        put(p + key[len("visual.") :], value)
    else:
        raise ChineseClipImportError(f"unexpected ResNet tensor '{key}'")


def _vocab_lines(vocab: str) -> int | None:
    if vocab == "bert-chinese":
        from vilref_fed.model.tokenizer import chinese_vocab_path

        path = chinese_vocab_path()
    else:
        path = Path(vocab).expanduser()
        if not path.is_file():
            raise ChineseClipImportError(
                f"tokenizer vocabulary {vocab} is not a file; give the release's vocab.txt"
            )
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def import_chinese_clip(
    path: str | Path, context_length: int = 100, vocab: str = "bert-chinese", name: str | None = None
):
    """(ViLReFModel with the released weights, info) — strict: every tensor mapped, none left over."""
    from vilref_fed.model import build_model

    sd, info = read_chinese_clip_state_dict(path)
    layout = infer_layout(sd)
    if vocab != "bert-chinese":
        vocab = str(Path(vocab).expanduser().resolve())
    lines = _vocab_lines(vocab)
    if lines != layout.vocab_size:
        raise ChineseClipImportError(
            f"the tokenizer vocabulary has {lines} entries but the checkpoint's text tower has "
            f"{layout.vocab_size}; use the vocab.txt released with the model (--vocab)"
        )
    model = build_model(model_config_for(layout, context_length, vocab, name))
    converted = convert_state_dict(sd, layout)
    own = {k: v for k, v in model.state_dict().items() if torch.is_floating_point(v)}
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise ChineseClipImportError(
            f"checkpoint does not cover our model exactly (missing {len(missing)}: {missing[:3]}, "
            f"unexpected {len(unexpected)}: {unexpected[:3]})"
        )
    for k, v in converted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ChineseClipImportError(
                f"tensor {k} has shape {tuple(v.shape)}, our tower expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(converted, strict=False)
    model.eval()
    info = dict(info)
    info["layout"] = layout.__dict__
    return model, info


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_to_checkpoint(
    src: str | Path,
    out: str | Path,
    context_length: int = 100,
    vocab: str = "bert-chinese",
    prompt_language: str = "zh",
    name: str | None = None,
) -> Path:
    """Import and write a vilref-fed model file that `vilref-client screen --model` reads.

    The released model was trained on Chinese reports, so its prompts default to Chinese. The ontology
    hash recorded is that of the ontology whose prompts will score it (it was not trained with ours).
    """
    from vilref_fed.model import save_checkpoint
    from vilref_fed.ontology import load_ontology

    model, info = import_chinese_clip(src, context_length=context_length, vocab=vocab, name=name)
    meta = {
        "ontology_hash": load_ontology().hash,
        "prompt_language": prompt_language,
        "source": {
            "format": "chinese-clip",
            "file": Path(src).name,
            "sha256": file_sha256(src),
            **{k: info[k] for k in ("epoch", "step", "name") if k in info},
        },
    }
    return save_checkpoint(out, model, extra=meta)
