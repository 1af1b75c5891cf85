"""Asymmetric integer quantization of cached keys and values (after KIVI, Liu et al. 2024,
https://arxiv.org/abs/2402.02750): keys per channel, values per token.

Keys have outlier channels, so each channel gets its own scale and zero point, shared by a
*group* of tokens (the tokens of one head that entered the packed store in the same compression
event). Values get one scale and zero point per token. Evicting tokens later only drops rows:
a group's scale stays valid, so nothing is quantized twice. int4 codes are packed two per byte.
"""

from __future__ import annotations

import torch

BITS = {"int8": 8, "int4": 4}


def check_quant(quant: str | None) -> str | None:
    if quant is not None and quant not in BITS:
        raise ValueError(f"quant must be None, 'int8' or 'int4', got {quant!r}")
    return quant


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 needs an even head size, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, packed for int4), scale and zero (float16, ``x``'s shape with ``dim`` reduced).

    ``x ~= codes * scale + zero`` with codes in ``[0, 2^bits - 1]``.
    """
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True).float()
    hi = x.amax(dim=dim, keepdim=True).float()
    scale = ((hi - lo) / levels).half().float()
    zero = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x.float() - zero) / safe).clamp_(0, levels).to(torch.uint8)
    return _pack(codes, bits), scale.squeeze(dim).half(), zero.squeeze(dim).half()


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """``codes [N, Dc]`` with per-row (``scale [N, 1]``) or per-row-and-channel (``[N, D]``) parameters."""
    return (_unpack(codes, bits).to(dtype) * scale.to(dtype) + zero.to(dtype)).contiguous()
