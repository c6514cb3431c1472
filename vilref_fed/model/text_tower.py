"""Text tower: a transformers BertModel; token ids -> one feature vector per report [B, width]."""

from __future__ import annotations

import torch
from torch import nn

from vilref_fed.model.config import TextConfig
from vilref_fed.model.pretrained import resolve_text_weights


class BertTextTower(nn.Module):
    """BERT with [CLS] or masked-mean pooling.

    position_ids and token_type_ids are passed explicitly with the batch's shape: Opacus computes
    per-sample gradients from them, and BERT's own buffers have batch size 1.
    """

    def __init__(self, t: TextConfig, pretrained: bool = False) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        if pretrained and t.pretrained:
            path = resolve_text_weights(t.pretrained)
            if not path.is_dir():
                raise ValueError(f"text weights {path} must be a transformers model directory")
            self.bert = BertModel.from_pretrained(
                str(path),
                add_pooling_layer=False,
                local_files_only=True,
                hidden_dropout_prob=t.dropout,
                attention_probs_dropout_prob=t.dropout,
            )
            got = self.bert.config
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
                if getattr(got, name) != getattr(t, name):
                    raise ValueError(
                        f"pretrained text weights at {path} have {name}={getattr(got, name)}, "
                        f"the model config says {getattr(t, name)}"
                    )
        else:
            self.bert = BertModel(
                BertConfig(
                    vocab_size=t.vocab_size,
                    hidden_size=t.hidden_size,
                    num_hidden_layers=t.num_hidden_layers,
                    num_attention_heads=t.num_attention_heads,
                    intermediate_size=t.intermediate_size,
                    max_position_embeddings=t.max_position_embeddings,
                    hidden_dropout_prob=t.dropout,
                    attention_probs_dropout_prob=t.dropout,
                    type_vocab_size=2,
                    pad_token_id=0,
                ),
                add_pooling_layer=False,
            )
        self.pooling = t.pooling
        self.width = t.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        position_ids = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(b, n)
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        ).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
