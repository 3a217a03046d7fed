"""LlamaGen-style transformer blocks: pre-RMSNorm (eps 1e-5), SwiGLU FFN, no biases."""
from torch import nn
from torch.nn import functional as F

from .attention import SetAttention


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


class FeedForward(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with hidden ``find_multiple(int(2 * 4 * dim / 3), 256)``."""

    def __init__(self, dim, multiple_of=256, dropout=0.0):
        super().__init__()
        hidden = find_multiple(int(2 * 4 * dim / 3), multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """``h = x + attn(norm(x)); out = h + ffn(norm(h))``, with an optional cross-attention
    sub-layer (SAR's decoder) between the two. Keys match LlamaGen's TransformerBlock."""

    def __init__(self, dim, num_heads, num_kv_heads=None, cross=False, dropout=0.0,
                 multiple_of=256, qk_norm=False):
        super().__init__()
        self.attention = SetAttention(dim, num_heads, num_kv_heads, qk_norm=qk_norm)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        if cross:
            self.cross_attention = SetAttention(dim, num_heads, num_kv_heads, qk_norm=qk_norm)
            self.cross_norm = nn.RMSNorm(dim, eps=1e-5)
        self.feed_forward = FeedForward(dim, multiple_of, dropout)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, sets, *, rope=None, cache=None, cache_slots=0, memory=None,
                memory_sets=None, memory_rope=None, memory_cache=None, memory_slots=0):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), sets, rope=rope,
                                                  cache=cache, cache_slots=cache_slots))
        if memory is not None:
            x = x + self.resid_dropout(self.cross_attention(
                self.cross_norm(x), sets, context=memory, context_sets=memory_sets,
                strict=True, rope=memory_rope, cache=memory_cache, cache_slots=memory_slots))
        return x + self.feed_forward(self.ffn_norm(x))
