"""Find retrieval heads for :class:`~subquad.kv.policies.DuoAttention` with the model frozen.

For a few passkey prompts, the score of a KV head is the attention its query heads pay to the
needle from the question tokens (mean over prompts, queries and the query heads of the group):
heads that fetch the needle from far away score high, heads that look at sinks and recent
tokens score low. Takes one forward pass per prompt.
"""

from __future__ import annotations

import torch

from subquad.kv.cache import CompressedCache, multi_part_attention
from subquad.kv.passkey import passkey_prompt
from subquad.kv.policies import HeadRoles


@torch.no_grad()
def calibrate_head_roles(
    model,
    tokenizer,
    *,
    samples: int = 4,
    context_tokens: int = 1024,
    seed: int = 1000,
    progress: bool = False,
) -> HeadRoles:
    """Retrieval scores ``[layers][KV heads]`` from ``samples`` passkey prompts (seeds ``seed..``)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    total = None
    for i in range(samples):
        p = passkey_prompt(tokenizer, context_tokens, depth=(i + 0.5) / samples, seed=seed + i)
        ids = torch.cat([p.context, p.question], dim=1)
        nq = p.question.shape[1]
        cache = CompressedCache(model, None, query_window=nq)
        model(ids, cache=cache, use_cache=True)
        rows = []
        for layer in cache.layers:
            q, k = layer.qwin, layer.keys  # [1, Hq, nq, D], [1, H, T, D]
            b, hq, _, d = q.shape
            h, t = k.shape[1], k.shape[2]
            qpos = torch.arange(t - nq, t)
            allowed = (torch.arange(t)[None, :] <= qpos[:, None])[None, None]
            _, sums = multi_part_attention(
                q.reshape(b, h, hq // h, nq, d), [(k, layer.values, allowed)], layer.scaling, want_sums=True
            )
            mass = sums[0][0, :, p.needle[0] : p.needle[1]].sum(-1) / (nq * hq // h)
            rows.append(mass)
        score = torch.stack(rows)
        total = score if total is None else total + score
        if progress:
            print(f"calibration prompt {i + 1}/{samples}")
    scores = (total / samples).tolist()
    return HeadRoles(
        scores=scores,
        source={"method": "needle attention of question", "samples": samples, "context": context_tokens},
    )


@torch.no_grad()
def calibrate_induction_heads(model, *, samples: int = 2, length: int = 256, seed: int = 2000) -> HeadRoles:
    """Echo + induction scores ``[layers][KV heads]`` for :class:`~subquad.kv.policies.RazorAttention`.

    A random token sequence of ``length`` is repeated once; at position ``length + j`` of the repeat,
    the *echo* score is the attention to the earlier copy of the current token (``j``) and the
    *induction* score the attention to the token that followed it (``j + 1``); means over queries,
    samples and the query heads of each KV head. The role score is their sum.
    """
    if samples < 1 or length < 2:
        raise ValueError(f"samples >= 1 and length >= 2 required, got {samples}, {length}")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    echo = induction = None
    g = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        seq = torch.randint(0, vocab, (1, length), generator=g)
        ids = torch.cat([seq, seq], dim=1)
        n = length - 1  # queries of the repeat that have a following token in the first copy
        cache = CompressedCache(model, None, query_window=length)
        model(ids, cache=cache, use_cache=True)
        e_rows, i_rows = [], []
        for layer in cache.layers:
            q, k = layer.qwin, layer.keys  # [1, Hq, length, D], [1, H, 2 length, D]
            b, hq, _, d = q.shape
            h, t = k.shape[1], k.shape[2]
            qpos = torch.arange(t - length, t)
            allowed = (torch.arange(t)[None, :] <= qpos[:, None])[None, None]
            qg = q.reshape(b, h, hq // h, length, d)
            s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * layer.scaling
            p = torch.softmax(s.float().masked_fill(~allowed.unsqueeze(2), float("-inf")), dim=-1)
            j = torch.arange(n)
            e_rows.append(p[0, :, :, j, j].mean(dim=(1, 2)))
            i_rows.append(p[0, :, :, j, j + 1].mean(dim=(1, 2)))
        e, i = torch.stack(e_rows), torch.stack(i_rows)
        echo = e if echo is None else echo + e
        induction = i if induction is None else induction + i
    echo, induction = echo / samples, induction / samples
    return HeadRoles(
        scores=(echo + induction).tolist(),
        source={"method": "echo + induction", "echo": echo.tolist(), "induction": induction.tolist()},
    )
