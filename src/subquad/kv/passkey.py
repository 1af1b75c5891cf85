"""Passkey retrieval prompts in natural text for pretrained models (Mohtashami & Jaggi 2023,
https://arxiv.org/abs/2305.16300): a number hidden in repeated filler at a chosen depth, then a
question. Built in token space so the length is exact and the needle's token span is known."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    context: torch.Tensor  # [1, T_ctx] ids: intro, filler with the needle
    question: torch.Tensor  # [1, T_q] ids
    needle: tuple[int, int]  # [start, end) token span of the needle inside the context
    answer: str


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int = 0) -> PasskeyPrompt:
    """A prompt of ``context_tokens`` context tokens with the needle at ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    intro, filler, needle = ids(INTRO), ids(FILLER), ids(NEEDLE.format(key=key))
    room = context_tokens - len(intro) - len(needle)
    if room < len(filler):
        raise ValueError(f"context_tokens={context_tokens} is too short for a passkey prompt")
    body = (filler * (room // len(filler) + 1))[:room]
    # the needle goes at a sentence boundary of the filler nearest to the requested depth
    cut = round(depth * (room // len(filler))) * len(filler)
    cut = min(cut, room)
    tokens = intro + body[:cut] + needle + body[cut:]
    start = len(intro) + cut
    return PasskeyPrompt(
        context=torch.tensor([tokens]),
        question=torch.tensor([ids(QUESTION)]),
        needle=(start, start + len(needle)),
        answer=key,
    )
