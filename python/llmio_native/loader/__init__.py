"""The token loader: exact, resumable, distributed sampling of token windows."""
from .order import derive_key, permute, stride_schedule
from .token_loader import TokenLoader

__all__ = ["TokenLoader", "permute", "derive_key", "stride_schedule"]
