"""Report tokenizer: texts -> fixed-length input_ids / attention_mask for the text tower.

The default vocabulary is Google's Chinese BERT WordPiece vocabulary (vendored in model/vocab/),
which is the paper's and covers both the Chinese and the English reports of the consortium:
CJK characters become one token each, English becomes lower-cased word pieces.

Note (transformers 5): `BertTokenizer(vocab_file=path)` silently ignores the file and builds a
5-token vocabulary; `BertTokenizer(vocab=path)` is the working spelling.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from vilref_fed.model.pretrained import minilm_dir

CHINESE_VOCAB = "bert-chinese"


def chinese_vocab_path() -> Path:
    return Path(str(resources.files("vilref_fed.model") / "vocab" / "bert_chinese_vocab.txt"))


def _load_hf_tokenizer(vocab: str):
    from transformers import AutoTokenizer, BertTokenizer

    if vocab == CHINESE_VOCAB:
        return BertTokenizer(vocab=str(chinese_vocab_path()), do_lower_case=True)
    if vocab == "minilm":
        return BertTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    path = Path(vocab).expanduser()
    if path.is_file():
        return BertTokenizer(vocab=str(path), do_lower_case=True)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise ValueError(
        f"tokenizer vocabulary {vocab!r} is neither 'bert-chinese', 'minilm', a vocab.txt file nor a "
        "tokenizer directory on this machine"
    )


def normalise_report(text: str | None) -> str:
    """NFKC (full-width Latin letters and digits in Chinese reports -> ASCII) and collapsed whitespace."""
    if text is None:
        return ""
    return " ".join(unicodedata.normalize("NFKC", str(text)).split())


class ReportTokenizer:
    """Callable: list of report texts -> {"input_ids", "attention_mask"} LongTensors [B, context_length]."""

    def __init__(self, vocab: str, context_length: int) -> None:
        self.vocab = vocab
        self.context_length = int(context_length)
        self.hf = _load_hf_tokenizer(vocab)
        self.vocab_size = len(self.hf)

    def __call__(self, texts: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of texts, not one string")
        clean = [normalise_report(t) for t in texts]
        enc = self.hf(
            clean,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def decode_tokens(self, input_ids: torch.Tensor) -> list[str]:
        """The word pieces of one row (for debugging and tests; never log report text)."""
        return self.hf.convert_ids_to_tokens(input_ids.tolist())


@lru_cache(maxsize=8)
def get_tokenizer(vocab: str, context_length: int) -> ReportTokenizer:
    """One tokenizer per (vocabulary, length) per process; building one reads the vocab file."""
    return ReportTokenizer(vocab, context_length)
