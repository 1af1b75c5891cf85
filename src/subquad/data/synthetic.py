"""Synthetic tasks that separate token mixers: recall, copying, retrieval and state tracking.

Shape legend: N examples, L sequence length.

Every generator is a pure function of its arguments and ``seed`` and returns a ``TaskData`` with
``inputs [N, L]`` (int64 token ids) and ``targets [N, L]``: ``targets[n, t]`` is the token the model
must predict *after reading* ``inputs[n, :t + 1]`` (already shifted: compare ``logits[:, t]`` with
``targets[:, t]``), and -100 wherever nothing is asked. ``train_test`` gives disjoint seeds to the
two splits.

Token 0 is the pad/filler token in every task.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class TaskData:
    """``inputs [N, L]`` and next-token ``targets [N, L]`` (-100 where nothing is asked); ``vocab_size``
    is the number of token ids the task uses."""

    inputs: torch.Tensor
    targets: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.inputs.shape != self.targets.shape:
            raise ValueError(
                f"inputs {tuple(self.inputs.shape)} and targets {tuple(self.targets.shape)} differ"
            )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def mqar(
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    seed: int = 0,
) -> TaskData:
    """Multi-query associative recall as defined in Zoology (Arora et al. 2023,
    https://arxiv.org/abs/2312.04927).

    The sequence opens with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys drawn without
    replacement from the first half of the vocabulary, values from the second half, so keys and
    values are disjoint), followed by a query region of filler (token 0) in which every key appears
    exactly once, at a position drawn from a power law over the distance from the context
    (``p(gap) ~ gap^(power_a - 1)``, most queries soon, some far). Right after reading a query key the
    model must predict its value; that is the only supervised position of each query.
    """
    _check_positive(num_examples=num_examples, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    context = 2 * num_pairs
    if seq_len < 2 * context:
        raise ValueError(f"seq_len={seq_len} must be >= 4 * num_pairs={4 * num_pairs} (pairs + queries)")
    half = vocab_size // 2
    if half - 1 < num_pairs:
        raise ValueError(f"vocab_size={vocab_size} gives {half - 1} keys, fewer than num_pairs={num_pairs}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    g = _gen(seed)
    # query slots are even offsets in the query region; slot s costs 2 tokens (key, then its value)
    slots = (seq_len - context) // 2
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    slot_p = power_a * gaps ** (power_a - 1)
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    targets = torch.full((num_examples, seq_len), IGNORE, dtype=torch.long)
    for n in range(num_examples):
        keys = 1 + torch.randperm(half - 1, generator=g)[:num_pairs]
        values = half + torch.randperm(vocab_size - half, generator=g)[:num_pairs]
        inputs[n, 0:context:2] = keys
        inputs[n, 1:context:2] = values
        chosen = torch.multinomial(slot_p, num_pairs, replacement=False, generator=g)  # distinct slots
        order = torch.randperm(num_pairs, generator=g)
        pos = context + 2 * chosen
        inputs[n, pos] = keys[order]
        inputs[n, pos + 1] = values[order]
        targets[n, pos] = values[order]
    return TaskData(inputs, targets, vocab_size)


def selective_copying(
    num_examples: int, seq_len: int, num_tokens: int, vocab_size: int = 16, seed: int = 0
) -> TaskData:
    """Selective copying (Mamba, Gu & Dao 2023, https://arxiv.org/abs/2312.00752): ``num_tokens``
    content tokens (ids 3..vocab-1) sit at random positions of a noise region of ``seq_len`` tokens
    (filler 0); then a separator (1) and ``num_tokens`` copy markers (2) follow, and at the separator
    and each marker the model must produce the content tokens in their order."""
    _check_positive(num_examples=num_examples, seq_len=seq_len, num_tokens=num_tokens)
    if num_tokens > seq_len:
        raise ValueError(f"num_tokens={num_tokens} must be <= seq_len={seq_len}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (filler, separator, marker, content), got {vocab_size}")
    g = _gen(seed)
    total = seq_len + 1 + num_tokens
    inputs = torch.zeros(num_examples, total, dtype=torch.long)
    targets = torch.full((num_examples, total), IGNORE, dtype=torch.long)
    for n in range(num_examples):
        content = torch.randint(3, vocab_size, (num_tokens,), generator=g)
        pos = torch.randperm(seq_len, generator=g)[:num_tokens].sort().values
        inputs[n, pos] = content
        inputs[n, seq_len] = 1
        inputs[n, seq_len + 1 :] = 2
        targets[n, seq_len : seq_len + num_tokens] = content  # at the separator and each marker but the last
    return TaskData(inputs, targets, vocab_size)


def induction_heads(num_examples: int, seq_len: int, vocab_size: int = 32, seed: int = 0) -> TaskData:
    """Induction heads (Olsson et al. 2022; as in H3/Zoology): random tokens (2..vocab-1) with one
    trigger token (1) somewhere followed by a token X; the sequence ends with the trigger again,
    after which the model must predict X."""
    _check_positive(num_examples=num_examples, seq_len=seq_len)
    if seq_len < 4 or vocab_size < 3:
        raise ValueError(f"need seq_len >= 4 and vocab_size >= 3, got {seq_len}, {vocab_size}")
    g = _gen(seed)
    inputs = torch.randint(2, vocab_size, (num_examples, seq_len), generator=g)
    targets = torch.full((num_examples, seq_len), IGNORE, dtype=torch.long)
    pos = torch.randint(0, seq_len - 3, (num_examples,), generator=g)
    rows = torch.arange(num_examples)
    inputs[rows, pos] = 1
    inputs[:, -1] = 1
    targets[:, -1] = inputs[rows, pos + 1]
    return TaskData(inputs, targets, vocab_size)


def passkey(
    num_examples: int, seq_len: int, depth: float, digits: int = 5, filler_period: int = 17, seed: int = 0
) -> TaskData:
    """Passkey retrieval in filler (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300), in
    token space: a repeating filler pattern (ids 13..13+filler_period-1), with ``marker, d1..dn`` (the
    passkey, digit ids 3..12) inserted at ``depth`` (0 = start, 1 = end of the filler); the sequence
    ends with the query token (2) after which the model must emit the ``digits`` passkey digits."""
    _check_positive(num_examples=num_examples, seq_len=seq_len, digits=digits, filler_period=filler_period)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    body = seq_len - (1 + digits) - (1 + digits)  # filler length around the inserted key and the answer
    if body < 1:
        raise ValueError(f"seq_len={seq_len} is too short for a {digits}-digit passkey")
    g = _gen(seed)
    vocab = 13 + filler_period
    total = seq_len
    inputs = torch.zeros(num_examples, total, dtype=torch.long)
    targets = torch.full((num_examples, total), IGNORE, dtype=torch.long)
    at = round(depth * body)
    filler = 13 + torch.arange(body) % filler_period
    for n in range(num_examples):
        key = 3 + torch.randint(0, 10, (digits,), generator=g)
        seq = torch.cat([filler[:at], torch.tensor([1]), key, filler[at:], torch.tensor([2]), key])
        inputs[n] = seq
        answer_start = total - digits - 1  # the query token
        targets[n, answer_start : answer_start + digits] = key
    return TaskData(inputs, targets, vocab)


def parity(num_examples: int, seq_len: int, seed: int = 0, every_position: bool = True) -> TaskData:
    """Parity of a bit string (tokens 0/1 as ids 1/2): after each prefix (or only the whole string),
    predict its parity as id 1 (even) or 2 (odd). Solvable by a 2-state recurrence whose transition has
    a negative eigenvalue (Grazzi et al. 2024, https://arxiv.org/abs/2411.12537)."""
    _check_positive(num_examples=num_examples, seq_len=seq_len)
    g = _gen(seed)
    bits = torch.randint(0, 2, (num_examples, seq_len), generator=g)
    prefix = torch.cumsum(bits, dim=1) % 2
    targets = prefix + 1
    if not every_position:
        targets[:, :-1] = IGNORE
    return TaskData(bits + 1, targets, 3)


S5_ELEMENTS: list[tuple[int, ...]] = list(itertools.permutations(range(5)))
_S5_INDEX = {p: i for i, p in enumerate(S5_ELEMENTS)}


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation ``x -> b[a[x]]``: first a, then b."""
    return tuple(b[a[x]] for x in range(len(a)))


def s5_word_problem(num_examples: int, seq_len: int, seed: int = 0) -> TaskData:
    """The S5 word problem (Merrill et al. 2024; Grazzi et al. 2024): inputs are permutations of 5
    elements (ids 0..119 in ``S5_ELEMENTS`` order); after each prefix predict the id of their
    composition (left to right). Needs state tracking beyond any diagonal recurrence."""
    _check_positive(num_examples=num_examples, seq_len=seq_len)
    g = _gen(seed)
    inputs = torch.randint(0, 120, (num_examples, seq_len), generator=g)
    targets = torch.empty_like(inputs)
    # composition table [120, 120] -> id, so a prefix product is one gather per step
    table = torch.tensor([[_S5_INDEX[compose(a, b)] for b in S5_ELEMENTS] for a in S5_ELEMENTS])
    acc = inputs[:, 0]
    targets[:, 0] = acc
    for t in range(1, seq_len):
        acc = table[acc, inputs[:, t]]
        targets[:, t] = acc
    return TaskData(inputs, targets, 120)


TASKS: dict[str, Callable[..., TaskData]] = {
    "mqar": mqar,
    "selective_copying": selective_copying,
    "induction_heads": induction_heads,
    "passkey": passkey,
    "parity": parity,
    "s5": s5_word_problem,
}


def train_test(
    task: str, num_train: int, num_test: int, seed: int = 0, **kwargs
) -> tuple[TaskData, TaskData]:
    """Train and test sets of ``task`` with disjoint seeds (``2 * seed`` and ``2 * seed + 1``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    make = TASKS[task]
    return make(num_train, seed=2 * seed, **kwargs), make(num_test, seed=2 * seed + 1, **kwargs)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of supervised positions (targets != -100) where the argmax is the target."""
    mask = targets != IGNORE
    if not bool(mask.any()):
        return math.nan
    return float((logits.argmax(-1)[mask] == targets[mask]).double().mean())
