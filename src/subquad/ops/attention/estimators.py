"""Block-mask estimators: which key blocks each query block should read, guessed from q and k at a
fraction of the cost of attention, for the block-sparse engine (``attention(..., block_mask=)``).

Shape legend: B batch, T time, H query heads, Hk key heads (dividing H), K key dim, b block size,
nb = ceil(T / b) blocks, I query block, J key block, S stride, L last queries.

Every estimator returns a bool ``[B, H, nb, nb]`` that always keeps, where visible, the first key
block (attention sinks) and the diagonal block (the local context, so that every query sees at
least one key), and never keeps a block that the causal rule hides entirely. Budgets:

- ``xattention_mask``: a cumulative-mass ``threshold`` per query block (the density follows);
- ``vertical_slash_mask``: numbers of key columns and diagonals (tokens) per head;
- ``quest_mask`` and ``nsa_mask``: ``topk``, the number of key blocks each query block reads,
  the mandatory ones included (as in both papers: a fixed number of pages / selected blocks).

``mask_density(mask, causal)`` is the kept fraction of visible blocks, for reporting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import exp_fast, pad_time


def _check(q, k, block_size, causal, scale):
    K = val.check_grouped_qkv(q, k)[-1]
    val.check_same_dtype_device({"q": q, "k": k})
    val.check_chunk_size(block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return val.resolve_scale(scale, K)


def _check_fraction(name: str, x: float) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {x!r}")


def _check_count(name: str, n: int, minimum: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n!r}")


def _visible(nb: int, causal: bool, device) -> torch.Tensor:
    """``[nb, nb]`` blocks with at least one visible (query, key) pair."""
    ones = torch.ones(nb, nb, dtype=torch.bool, device=device)
    return ones.tril() if causal else ones


def _mandatory(nb: int, causal: bool, device) -> torch.Tensor:
    """``[nb, nb]`` the first key block and the diagonal, where visible."""
    m = torch.eye(nb, dtype=torch.bool, device=device)
    m[:, 0] = True
    return m & _visible(nb, causal, device)


def _rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest (ties broken by position)."""
    order = score.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def _top_blocks(score: torch.Tensor, topk: int, causal: bool) -> torch.Tensor:
    """Keep, per query block, the mandatory blocks and then the highest-scoring visible ones, up
    to ``topk`` blocks in all. score ``[B, H, nb, nb]``."""
    nb = score.shape[-1]
    vis, must = _visible(nb, causal, score.device), _mandatory(nb, causal, score.device)
    score = score.float().masked_fill(must, float("inf")).masked_fill(~vis, float("-inf"))
    return ((_rank(score) < topk) | must) & vis


def _expand_heads(k: torch.Tensor, H: int) -> torch.Tensor:
    return k if k.shape[2] == H else k.repeat_interleave(H // k.shape[2], dim=2)


def antidiagonal_scores(
    q: torch.Tensor, k: torch.Tensor, stride: int, length: int | None = None
) -> torch.Tensor:
    """``A [B, H, n, n]`` with ``A[i, j] = sum_s q[iS + S-1-s] . k[jS + s]``: the sum of the
    antidiagonal of each ``S x S`` cell of ``q k^T``, as one matmul of rows grouped S at a time
    (queries reversed within a group). q ``[B, T, H, K]``, k ``[B, T, H, K]``; both are zero-padded
    to ``length`` (default T rounded up to a multiple of S), ``n = length / S``."""
    B, T, H, K = q.shape
    S = stride
    length = length or -(-T // S) * S
    qp, kp = (F.pad(x.float(), (0, 0, 0, 0, 0, length - T)) for x in (q, k))
    n = length // S
    qs = qp.view(B, n, S, H, K).flip(2).permute(0, 3, 1, 2, 4).reshape(B, H, n, S * K)
    ks = kp.view(B, n, S, H, K).permute(0, 3, 1, 2, 4).reshape(B, H, n, S * K)
    return torch.matmul(qs, ks.transpose(-1, -2))


@torch.no_grad()
def xattention_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    stride: int = 16,
    threshold: float = 0.9,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """XAttention (Xu et al. 2025, https://arxiv.org/abs/2503.16428): score each block by its
    antidiagonals and keep, per query block, the fewest blocks whose estimated attention mass
    reaches ``threshold``.

    With stride S, query rows are grouped S at a time in reverse order and key rows S at a time in
    order, so that one dot product of the grouped rows, ``sum_s q[iS + S-1-s] . k[jS + s]``, is the
    sum of one antidiagonal of the S x S cell (i, j): it meets every row and column of the cell
    once. A softmax over these ``T/S x T/S`` cell scores (scaled by ``scale / S``, causal at cell
    level) estimates the attention; summed over the ``b/S x b/S`` cells of a block and normalized
    per query block it is the block's share of the mass. Blocks are then taken in decreasing mass
    (first key block and diagonal first) until the running sum reaches ``threshold``.
    Cost ``T^2 K / S`` per head (1/S of dense attention).

    Blind spot (measured in the tests): an antidiagonal of a cell covers the diagonals
    ``i - j = S-1-2s``, one parity only, so a one-token-wide diagonal of the other parity (even
    offsets for even S) is invisible to it; diagonals a few tokens wide, as in trained models,
    are seen.

    Args:
        q ``[B, T, H, K]``, k ``[B, T, Hk, K]``; block_size b (a multiple of ``stride``);
        stride S >= 1; threshold in (0, 1]; causal; scale default ``K ** -0.5``.

    Returns:
        bool ``[B, H, nb, nb]``.
    """
    scale = _check(q, k, block_size, causal, scale)
    _check_count("stride", stride, 1)
    if block_size % stride:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
    _check_fraction("threshold", threshold)
    B, T, H, _ = q.shape
    b, S = block_size, stride
    nb = -(-T // b)
    n = -(-T // b) * b // S  # cells per side
    s = antidiagonal_scores(q, _expand_heads(k, H), S, nb * b).mul_(scale / S)  # [B, H, n, n]
    cells = torch.arange(n, device=q.device)
    real = cells * S < T  # cells holding at least one real token
    keep = real[None, :] & real[:, None]
    if causal:
        keep &= cells[None, :] <= cells[:, None]
    p = s.masked_fill_(~keep, float("-inf")).softmax(-1).nan_to_num_(0.0)
    mass = p.view(B, H, nb, b // S, nb, b // S).sum((3, 5))  # [B, H, nb, nb]
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    vis, must = _visible(nb, causal, q.device), _mandatory(nb, causal, q.device)
    order_score = mass.masked_fill(must, float("inf")).masked_fill(~vis, float("-inf"))
    order = order_score.sort(dim=-1, descending=True, stable=True).indices
    sorted_mass = mass.gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the blocks ranked ahead
    take = before < threshold
    mask = torch.zeros_like(take).scatter_(-1, order, take)
    return (mask | must) & vis


def _probe_sums(q, k, L, scale):
    """Attention of the last ``L`` queries over all keys (causal), summed per key column and per
    diagonal offset ``d = i - j``: ``col, diag [B, H, T]`` in float32. One ``[L, T]`` probability
    block per (batch, head), reused in place: the whole ``[B, H, L, T]`` tensor (33 MB at L = 64,
    T = 16K, 8 heads) would be written and read several times over; one head's block stays in
    cache. k may have fewer heads (grouped): query head h reads key head ``h // (H / Hk)``."""
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    col = torch.zeros(B, H, T, device=q.device)
    diag = torch.zeros(B, H, T, device=q.device)
    # query T - L + l sees keys j <= T - L + l: of the last L - 1 columns (keys T - L + 1 + c),
    # row l's c >= l are hidden
    hidden = torch.ones(L, L - 1, dtype=torch.bool, device=q.device).triu()
    qs = q[:, T - L :].float() * scale
    kf = k.float()
    # the probabilities sit after L zero columns: row l of the skewed view (row stride T + L + 1)
    # reads pad[l, j + l], so column j = T - d sums row l's key T - L + l - d over l, the offset-d
    # diagonal (keys before 0 read the zeros); one strided sum instead of L shifted adds
    pad = torch.zeros(L, L + T, device=q.device)
    skew = pad.as_strided((L, T), (L + T + 1, 1), 1)
    for bi in range(B):
        for h in range(H):
            p = pad[:, L:]
            torch.mm(qs[bi, :, h], kf[bi, :, h // G].t(), out=p)  # [L, T]
            if L > 1:
                p[:, T - L + 1 :].masked_fill_(hidden, float("-inf"))
            p = exp_fast(p.sub_(p.amax(-1, keepdim=True)))
            p = p.div_(p.sum(-1, keepdim=True))
            torch.sum(p, 0, out=col[bi, h])
            diag[bi, h] = skew.sum(0).flip(0)
    return col, diag


@torch.no_grad()
def vertical_slash_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    last_q: int = 64,
    vertical: int = 512,
    slash: int = 512,
    scale: float | None = None,
) -> torch.Tensor:
    """MInference's vertical-slash pattern (Jiang et al. 2024, https://arxiv.org/abs/2407.02490),
    causal: the last ``last_q`` queries attend to every key; the ``vertical`` key columns with the
    most attention summed over them and the ``slash`` diagonals (offsets ``i - j``) with the most
    are kept. The pattern is returned at block level: a block is kept if it holds a kept column
    or is crossed by a kept diagonal (a superset of the token pattern); the first key block and
    the diagonal blocks are kept besides. Cost ``L T K`` per head.

    Args:
        q ``[B, T, H, K]``, k ``[B, T, Hk, K]``; block_size; last_q L >= 1; vertical, slash >= 1
        (capped at T); scale default ``K ** -0.5``.

    Returns:
        bool ``[B, H, nb, nb]``.
    """
    scale = _check(q, k, block_size, True, scale)
    for name, n in (("last_q", last_q), ("vertical", vertical), ("slash", slash)):
        _check_count(name, n, 1)
    B, T, H, _ = q.shape
    b = block_size
    nb = -(-T // b)
    L = min(last_q, T)
    col, diag = _probe_sums(q, k, L, scale)
    cols = col.topk(min(vertical, T), -1).indices  # [B, H, nv]
    offs = diag.topk(min(slash, T), -1).indices  # [B, H, ns]
    mask = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=q.device)
    # vertical: key block J = col // b for every query block at or after it
    colblock = torch.zeros(B, H, nb, dtype=torch.bool, device=q.device)
    colblock.scatter_(-1, cols // b, True)
    mask |= colblock[:, :, None, :]
    # slash at offset d: query block I (rows Ib .. Ib+b-1) meets keys Ib-d .. Ib+b-1-d, i.e. key
    # blocks floor((Ib-d)/b) .. floor((Ib+b-1-d)/b): the two blocks I - ceil(d/b), I - floor(d/b)
    I = torch.arange(nb, device=q.device)
    for shift in (offs // b, (offs + b - 1) // b):  # [B, H, ns]
        J = I[None, None, None, :] - shift[..., None]  # [B, H, ns, nb]
        ok = J >= 0
        hit = torch.zeros(B, H, nb, nb + 1, dtype=torch.bool, device=q.device)
        idx = torch.where(ok, J, nb)  # out-of-range diagonals land in a spare column
        rows = I.expand_as(J)
        hit[
            torch.arange(B, device=q.device)[:, None, None, None],
            torch.arange(H, device=q.device)[None, :, None, None],
            rows,
            idx,
        ] = True
        mask |= hit[..., :nb]
    vis = _visible(nb, True, q.device)
    return (mask | _mandatory(nb, True, q.device)) & vis


@torch.no_grad()
def quest_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    per_query: bool = False,
) -> torch.Tensor:
    """Quest (Tang et al. 2024, https://arxiv.org/abs/2406.10774): bound each key block by the
    elementwise min and max of its keys; the largest score a query can reach in the block is
    ``sum_d max(q_d min_d, q_d max_d) = relu(q) . max - relu(-q) . min``. Quest is a decoding
    method (one query); for a block of queries this bounds the whole block pair the same way,
    with the elementwise min and max of the queries too,
    ``sum_d max over {qmin_d, qmax_d} x {kmin_d, kmax_d}`` (cost ``4 nb^2 K`` per head), or, with
    ``per_query=True``, takes the largest per-query bound over the block's queries (tighter, cost
    ``2 T nb K``). Each query block keeps its ``topk`` highest-bounded key blocks.

    Args:
        q ``[B, T, H, K]``, k ``[B, T, Hk, K]``; block_size; topk >= 1 blocks per query block
        (first and diagonal included); causal; per_query.

    Returns:
        bool ``[B, H, nb, nb]``.
    """
    _check(q, k, block_size, causal, None)
    _check_count("topk", topk, 1)
    B, T, H, K = q.shape
    Hk = k.shape[2]
    G = H // Hk
    b = block_size
    nb = -(-T // b)
    pad = nb * b - T

    def envelope(x):  # [B, T, h, K] -> elementwise (min, max) per block, [B, h, nb, K]
        xf = x.float()

        def padded(value):  # (no copy when T is a multiple of b)
            return (F.pad(xf, (0, 0, 0, 0, 0, pad), value=value) if pad else xf).view(B, nb, b, -1, K)

        hi, lo = padded(-math.inf).amax(2), padded(math.inf).amin(2)
        return lo.transpose(1, 2), hi.transpose(1, 2)

    klo, khi = envelope(k)  # [B, Hk, nb, K]
    if per_query:
        qf = q.float().view(B, T, Hk, G, K).permute(0, 2, 3, 1, 4)  # [B, Hk, G, T, K]
        bound = torch.matmul(qf.clamp(min=0), khi[:, :, None].transpose(-1, -2)) - torch.matmul(
            (-qf).clamp(min=0), klo[:, :, None].transpose(-1, -2)
        )  # [B, Hk, G, T, nb]
        bound = F.pad(bound, (0, 0, 0, pad), value=-math.inf).view(B, Hk, G, nb, b, nb).amax(4)
    else:
        qlo, qhi = envelope(q)  # [B, H, nb, K]
        qlo, qhi = (x.view(B, Hk, G, nb, 1, K) for x in (qlo, qhi))
        klo, khi = (x.view(B, Hk, 1, 1, nb, K) for x in (klo, khi))
        bound = torch.empty(B, Hk, G, nb, nb, device=q.device)
        step = max(1, 2**22 // (B * H * nb * K))  # query blocks at a time: bounded memory
        for i in range(0, nb, step):
            lo, hi = qlo[:, :, :, i : i + step], qhi[:, :, :, i : i + step]
            best = torch.maximum(torch.maximum(lo * klo, lo * khi), torch.maximum(hi * klo, hi * khi))
            bound[:, :, :, i : i + step] = best.sum(-1)
    return _top_blocks(bound.reshape(B, H, nb, nb), topk, causal)


@torch.no_grad()
def nsa_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    scale: float | None = None,
) -> torch.Tensor:
    """The query-aware block selection of Native Sparse Attention (Yuan et al. 2025,
    https://arxiv.org/abs/2502.11089), causal: every key block is compressed to its mean key;
    each query's softmax over the compressed keys of the blocks before its own is its estimate of
    where its attention goes. A query block scores key blocks by these probabilities summed over
    its queries and over the query heads sharing a key head (grouped heads select the same
    blocks, as in the paper), and keeps its ``topk`` best (first and diagonal blocks included,
    like the paper's fixed initial and local blocks). Cost ``T nb K`` per head.

    Args:
        q ``[B, T, H, K]``, k ``[B, T, Hk, K]``; block_size; topk >= 1 blocks per query block;
        scale default ``K ** -0.5``.

    Returns:
        bool ``[B, H, nb, nb]``.
    """
    scale = _check(q, k, block_size, True, scale)
    _check_count("topk", topk, 1)
    return _top_blocks(nsa_block_scores(q, k, block_size, scale), topk, True)


# query blocks are scored in this many row groups: group g only reads the mean keys of the blocks
# up to its last one (the rest are masked anyway), about (G + 1) / 2G of the full score matrix
NSA_ROW_GROUPS = 8


def nsa_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """NSA's selection scores ``[B, H, nb, nb]``: for query block I and key block J < I, the softmax
    probability of J's mean key summed over I's queries and the heads sharing a key head (block 0's
    queries, which have no earlier block, put their mass on block 0)."""
    B, T, H, K = q.shape
    Hk = k.shape[2]
    b = block_size
    nb = -(-T // b)
    pad = nb * b - T
    counts = torch.full((nb,), float(b), device=q.device)
    counts[-1] = b - pad
    kc = pad_time(k.float(), b).view(B, nb, b, Hk, K).sum(2) / counts[None, :, None, None]
    # the scale rides on the nb mean keys; the queries are read in place, each head a strided
    # [T, K] matrix (no permuted copy of q)
    kc = (kc * scale).permute(0, 2, 3, 1).repeat_interleave(H // Hk, dim=1)  # [B, H, K, nb]
    qp = pad_time(q.float(), b)  # padded rows score like any query; their rows are dropped below
    t = torch.arange(nb * b, device=q.device)
    ends = (torch.arange(nb, device=q.device) + 1) * b - 1
    hidden = ~(ends[None, :] < t[:, None] - (t[:, None] % b))  # visible: blocks wholly before t's own
    hidden[:b, 0] = False  # the first block's queries have none: let them look at block 0 (kept anyway)
    real = (t < T).float().view(nb, b, 1)
    score = q.new_zeros(B, H, nb, nb, dtype=torch.float32)
    G = min(NSA_ROW_GROUPS, nb)
    for bi in range(B):
        for g in range(G):
            I0, I1 = g * nb // G, (g + 1) * nb // G
            c = max(I1 - 1, 1)  # columns this group's rows can see
            rows = slice(I0 * b, I1 * b)
            s = torch.matmul(qp[bi, rows].transpose(0, 1), kc[bi, :, :, :c])  # [H, rows, c]
            p = s.masked_fill_(hidden[rows, :c], float("-inf")).softmax(-1)
            p = p.view(H, I1 - I0, b, c).mul_(real[I0:I1]).sum(2) if pad else p.view(H, I1 - I0, b, c).sum(2)
            score[bi, :, I0:I1, :c] = p
    # grouped heads share the selection: sum the probabilities of the heads of one key head
    p = score.view(B, Hk, H // Hk, nb, nb).sum(2)
    return p.repeat_interleave(H // Hk, dim=1)


def mask_density(mask: torch.Tensor, causal: bool = True) -> float:
    """Fraction of the visible blocks a mask ``[.., nb, nb]`` keeps."""
    nb = mask.shape[-1]
    vis = _visible(nb, causal, mask.device)
    kept = (mask & vis).sum().item()
    return kept / (vis.sum().item() * (mask.numel() // (nb * nb)))


ESTIMATORS = {
    "xattention": xattention_mask,
    "vertical_slash": vertical_slash_mask,
    "quest": quest_mask,
    "nsa": nsa_mask,
}
