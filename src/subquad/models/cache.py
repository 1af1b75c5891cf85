"""The generation cache of the hybrid LM, on transformers' ``Cache`` API: one ``LayerCache`` per
layer, where recurrent layers keep their fixed-size state (and short-conv tails), window layers
their last ``window`` keys/values and full attention layers every key/value.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from subquad.layers import LayerCache


class SubquadCache(Cache):
    """A ``transformers.Cache`` whose layers are ``subquad.layers.LayerCache`` objects.

    Pass it as ``cache=`` to the model or to ``generate`` (which builds one by itself when none is
    given). ``nbytes()`` is the memory it holds; ``get_seq_length()`` the tokens seen.
    """

    def __init__(self, num_layers: int, memory: list[str] | None = None) -> None:
        super().__init__(layers=[LayerCache() for _ in range(num_layers)])
        self.memory = memory or ["recurrent"] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen_tokens if self.layers else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (allocated buffers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def used_bytes(self) -> int:
        """Bytes of states, conv tails and the used rows of key/value buffers."""
        return sum(layer.used_bytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            n = layer.state.shape[0] if layer.state is not None else None
            if n is None and layer.keys_values() is not None:
                n = layer.keys_values()[0].shape[0]
            if n is None and layer.conv:
                n = next(iter(layer.conv.values())).shape[0]
            if n is not None:
                layer.reorder(torch.arange(n).repeat_interleave(repeats))

    def reset(self) -> None:
        self.layers = [LayerCache() for _ in self.layers]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("SubquadCache cannot crop: recurrent states cannot be rolled back")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return any(layer.seen_tokens for layer in self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [m == "window" for m in self.memory]

    @property
    def is_linear(self) -> list[bool]:
        return [m == "recurrent" for m in self.memory]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)
