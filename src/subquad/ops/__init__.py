"""The ops: pure tensor functions, one folder per family. See DESIGN.md section 2 for the contract."""

from subquad.ops.attention import attention, attention_decode
from subquad.ops.delta_rule import delta_rule, gated_delta_rule
from subquad.ops.gla import gla
from subquad.ops.hyper import hyper_attention
from subquad.ops.linear_attn import linear_attn
from subquad.ops.mom import mom
from subquad.ops.neighborhood import neighborhood_attention
from subquad.ops.nsa import nsa
from subquad.ops.routing import routing_attention
from subquad.ops.rwkv7 import rwkv7
from subquad.ops.selective_scan import selective_scan
from subquad.ops.simple_gla import simple_gla
from subquad.ops.titans import titans
from subquad.ops.ttt_linear import ttt_linear

__all__ = [
    "attention",
    "attention_decode",
    "delta_rule",
    "gated_delta_rule",
    "gla",
    "hyper_attention",
    "linear_attn",
    "mom",
    "neighborhood_attention",
    "nsa",
    "routing_attention",
    "rwkv7",
    "selective_scan",
    "simple_gla",
    "titans",
    "ttt_linear",
]
