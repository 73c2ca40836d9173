"""The token loader: exact, resumable, distributed sampling of token windows.

Modules: :mod:`.token_loader` (the public ``TokenLoader``: arguments, state, iteration),
:mod:`.order` (seeded permutations, mixture scheduling), :mod:`.plan` (per-source window
order, batch planning), :mod:`.pipeline` (the host pipeline), :mod:`.cuda_path` (copies and
window cutting on the GPU), :mod:`.gpu_decode` and :mod:`.staging` (rans decode on the GPU),
:mod:`.stats` (counters), :mod:`.progress` (positions shared by DataLoader workers).
"""
from .order import derive_key, permute, stride_schedule
from .token_loader import TokenLoader

__all__ = ["TokenLoader", "permute", "derive_key", "stride_schedule"]
