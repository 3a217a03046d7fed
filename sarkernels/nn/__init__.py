"""Modules built on the sarkernels ops."""
from .attention import UNWRITTEN, KVCache, Rope, SetAttention
from .blocks import Block, FeedForward, find_multiple

__all__ = ["SetAttention", "KVCache", "Rope", "UNWRITTEN", "Block", "FeedForward", "find_multiple"]
