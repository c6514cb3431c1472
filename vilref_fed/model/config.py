"""Model configurations: small JSON files, so a consortium agrees on an architecture by name.

A configuration fully determines the architecture (and so the shape of every tensor that travels
in federation); pretrained weights are named separately and only loaded when asked for, from local
files, never from the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# "clip-vit" / "clip-resnet": OpenAI-CLIP towers (model/clip_towers.py) that the released ViLReF
# weights import into exactly (model/import_chinese_clip.py).
VISION_TYPES = ("vit", "resnet", "efficientnet-lite", "clip-vit", "clip-resnet")
TEXT_TYPES = ("bert",)
NORMS = ("batch", "group")


@dataclass
class VisionConfig:
    """The image tower. Fields unused by a tower type are ignored by it.

    type: "vit" (transformers ViTModel), "resnet" (transformers ResNetModel) or "efficientnet-lite".
    norm: "batch" or "group"; "group" swaps every BatchNorm for GroupNorm (needed by DP-SGD, and
      safer under non-IID federated averaging). ViT has LayerNorm only and ignores it.
    pool: how the tower's map becomes one vector: "cls" (ViT), "avg" or "attention" (CNNs; CLIP's
      attention pooling for the RN50 configuration).
    pretrained: None, "efficientnet-lite0" (the offline ImageNet weights), or a local path (a
      transformers model directory or a state-dict file).
    """

    type: str = "vit"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    depths: tuple[int, ...] = (3, 4, 6, 3)
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    embedding_size: int = 64
    layer_type: str = "bottleneck"
    variant: str = "efficientnet-lite0"
    norm: str = "batch"
    group_norm_groups: int = 32
    pool: str = "cls"
    attention_pool_heads: int = 32
    dropout: float = 0.0
    drop_connect_rate: float = 0.2
    pretrained: str | None = None


@dataclass
class TextConfig:
    """The text tower: a BERT-family encoder.

    vocab: "bert-chinese" (the vendored 21,128-token Google BERT Chinese vocabulary, handles Chinese
      and English), "minilm" (the English vocabulary of the offline all-MiniLM-L6-v2), or a path to
      a vocab.txt / tokenizer directory.
    pooling: "cls" (Chinese-CLIP and ViLReF) or "mean" (sentence-transformers checkpoints).
    pretrained: None, "minilm", or a local transformers model directory.
    """

    type: str = "bert"
    vocab: str = "bert-chinese"
    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    pooling: str = "cls"
    pretrained: str | None = None


@dataclass
class ModelConfig:
    """A dual-encoder configuration (what `build_model` reads).

    logit_scale_init is theta = log(1/tau), tau = 0.07; kappa = exp(theta) is clamped to
    max_logit_scale. learn_logit_scale=False keeps theta in a buffer (Opacus cannot wrap a bare
    trainable parameter on a module that also has buffers).
    """

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    vision: VisionConfig
    text: TextConfig
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    logit_scale_init: float = math.log(1 / 0.07)
    learn_logit_scale: bool = True
    max_logit_scale: float = 100.0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists: plain JSON types only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        _reject_unknown(cls, data, "model config")
        vision = data.pop("vision", None)
        text = data.pop("text", None)
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ValueError("model config needs 'vision' and 'text' sections (JSON objects)")
        for key in ("name", "embed_dim", "image_size", "context_length"):
            if key not in data:
                raise ValueError(f"model config is missing '{key}'")
        _reject_unknown(VisionConfig, vision, "model config 'vision' section")
        _reject_unknown(TextConfig, text, "model config 'text' section")
        for key in ("depths", "hidden_sizes"):
            if key in vision:
                vision[key] = tuple(int(v) for v in vision[key])
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        cfg = cls(vision=VisionConfig(**vision), text=TextConfig(**text), **data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        v, t = self.vision, self.text
        if v.type not in VISION_TYPES:
            raise ValueError(f"unknown image tower type {v.type!r}; use one of {', '.join(VISION_TYPES)}")
        if t.type not in TEXT_TYPES:
            raise ValueError(f"unknown text tower type {t.type!r}; use one of {', '.join(TEXT_TYPES)}")
        if v.norm not in NORMS:
            raise ValueError(f"unknown norm {v.norm!r}; use 'batch' or 'group'")
        if t.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown text pooling {t.pooling!r}; use 'cls' or 'mean'")
        if v.type in ("vit", "clip-vit") and self.image_size % v.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {v.patch_size}")
        if self.context_length > t.max_position_embeddings:
            raise ValueError(
                f"context_length {self.context_length} exceeds the text tower's "
                f"max_position_embeddings {t.max_position_embeddings}"
            )
        if self.embed_dim <= 0 or self.image_size <= 0 or self.context_length < 2:
            raise ValueError("embed_dim and image_size must be positive and context_length at least 2")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need three values (RGB)")


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(known)}")


def list_model_configs() -> list[str]:
    """Names of the configurations shipped with the package (the JSON files in model/configs/)."""
    root = resources.files("vilref_fed.model") / "configs"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_model_config(config: str | Path | dict[str, Any] | ModelConfig) -> ModelConfig:
    """A shipped name ("tiny", "vilref-vit-b16", ...), a path to a JSON file, a dict, or a ModelConfig."""
    if isinstance(config, ModelConfig):
        return ModelConfig.from_dict(config.to_dict())
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    text: str
    path = Path(config)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"model config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        names = list_model_configs()
        if str(config) not in names:
            raise ValueError(
                f"unknown model config {str(config)!r}; use one of {', '.join(names)} or a JSON file"
            )
        text = (resources.files("vilref_fed.model") / "configs" / f"{config}.json").read_text(
            encoding="utf-8"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"model config {config} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {config} must be a JSON object")
    return ModelConfig.from_dict(data)
