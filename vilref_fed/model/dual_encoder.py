"""The ViLReF dual encoder: image tower + text tower, linear projections, learnable logit scale.

The forward pass returns a dict whose keys are the loss functions' argument names
(image_features, text_features, logit_scale), so a new objective plugs in without touching the
training loop (open_clip's habit).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vilref_fed.model.config import ModelConfig, load_model_config
from vilref_fed.model.image_towers import build_image_tower
from vilref_fed.model.text_tower import BertTextTower
from vilref_fed.model.tokenizer import ReportTokenizer, get_tokenizer

# Sub-modules that make up the "online" model: what federation shares and what the momentum
# encoders copy. Everything a ViLReFModel holds is one of these (plus the logit scale).
TOWER_MODULES = ("image_tower", "text_tower", "image_proj", "text_proj")


class ViLReFModel(nn.Module):
    """Dual encoder. Attributes: image_tower, text_tower, image_proj, text_proj, logit_scale (theta).

    `logit_scale` holds theta = log(1/tau); forward returns kappa = exp(theta) clamped to
    `config.max_logit_scale`. With `config.learn_logit_scale=False` theta is a buffer, so the
    module can be wrapped by Opacus (it refuses a bare trainable parameter next to buffers).
    """

    def __init__(self, config: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.image_tower = build_image_tower(config, pretrained=pretrained)
        self.text_tower = BertTextTower(config.text, pretrained=pretrained)
        self.image_proj = nn.Linear(self.image_tower.width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_tower.width, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image_tower.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text_tower.width**-0.5)
        theta = torch.tensor(float(config.logit_scale_init))
        if config.learn_logit_scale:
            self.logit_scale = nn.Parameter(theta)
        else:
            self.register_buffer("logit_scale", theta)
        # from_pretrained leaves sub-models in eval mode (dropout off, BN frozen, Opacus sees nothing).
        self.train()

    # --- text ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> ReportTokenizer:
        """Cached per process and kept out of the module, so deep copies (momentum encoders) stay cheap."""
        return get_tokenizer(self.config.text.vocab, self.config.context_length)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Report texts -> {"input_ids", "attention_mask"} LongTensors [B, context_length] (CPU)."""
        return self.tokenizer(texts)

    # --- encoders -----------------------------------------------------------------------------
    def image_backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features [B, width] (what a linear probe reads, as in the paper)."""
        return self.image_tower(images)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image_proj(self.image_tower(images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        z = self.text_proj(self.text_tower(input_ids, attention_mask))
        return F.normalize(z, dim=-1) if normalize else z

    def kappa(self) -> torch.Tensor:
        """The logit scale kappa = exp(theta), clamped (gradient zero past the clamp)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.kappa(),
        }

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep theta in [0, log(max)] after an optimiser step (as CLIP): it cannot drift past the clamp."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per part (trainable and buffers excluded), for reports and logs."""
        count = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in TOWER_MODULES}
        count["logit_scale"] = 1 if isinstance(self.logit_scale, nn.Parameter) else 0
        count["total"] = sum(p.numel() for p in self.parameters())
        return count


def build_model(config: str | Path | dict[str, Any] | ModelConfig, pretrained: bool = False) -> ViLReFModel:
    """A ViLReF model from a shipped config name ("tiny", "small", "small-zh", "vilref-rn50",
    "vilref-vit-b16"), a JSON file, a dict or a ModelConfig.

    pretrained=True loads the weights named in the config's `pretrained` fields, from local files only.
    """
    return ViLReFModel(load_model_config(config), pretrained=pretrained)
