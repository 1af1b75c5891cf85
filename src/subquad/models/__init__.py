"""Models: the hybrid LM (layer pattern over the mixers of ``subquad.layers``) as Hugging Face
classes, registered with the Auto classes under ``model_type="subquad"``."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from subquad.models.cache import SubquadCache
from subquad.models.config import SubquadConfig, expand_pattern
from subquad.models.lm import SubquadForCausalLM, SubquadModel, causal_lm_loss

AutoConfig.register("subquad", SubquadConfig, exist_ok=True)
AutoModel.register(SubquadConfig, SubquadModel, exist_ok=True)
AutoModelForCausalLM.register(SubquadConfig, SubquadForCausalLM, exist_ok=True)

__all__ = [
    "SubquadCache",
    "SubquadConfig",
    "SubquadForCausalLM",
    "SubquadModel",
    "causal_lm_loss",
    "expand_pattern",
]
