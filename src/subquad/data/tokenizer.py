"""A byte-level BPE tokenizer trained at run time with ``tokenizers`` and saved beside the model
(as ``tokenizer.json`` plus the Hugging Face files, so ``AutoTokenizer.from_pretrained(dir)`` works)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` is id 0) on ``texts``."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + end of text), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``directory`` (raises FileNotFoundError naming the file when absent)."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: train with `subquad train`, which saves one")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
