"""Sample order: seeded bijective permutations and the mixture schedule.

Everything here is a pure function of (seed, epoch, source, position), so the global
sample stream never depends on world size, batch size or on where a run was resumed.
"""
from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, source, ...) through BLAKE2b."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def _round_keys(key: int, rounds: int) -> list[int]:
    return [derive_key(key, r) for r in range(rounds)]


def _mix(x: np.ndarray, k: int, mask: np.uint64) -> np.ndarray:
    # A cheap keyed mixer (splitmix64 finaliser); any function works in a Feistel round.
    z = (x + np.uint64(k & _MASK64)) & np.uint64(_MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z & mask


def permute(idx: np.ndarray | int, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """Image of positions ``idx`` under a seeded bijection of ``[0, n)``.

    A balanced Feistel network over the smallest even-bit power of two >= n, with
    cycle-walking back into range: O(1) memory, no table, vectorised over ``idx``.

    Raises:
        ValueError: ``n < 1`` or an index outside ``[0, n)``.
    """
    x = np.asarray(idx, dtype=np.uint64).copy()
    if n < 1:
        raise ValueError(f"permutation domain must be >= 1, got {n}")
    if x.size and int(x.max()) >= n:
        raise ValueError(f"index {int(x.max())} outside [0, {n})")
    if n == 1:
        return x
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half = bits // 2
    lo_mask = np.uint64((1 << half) - 1)
    keys = _round_keys(key, rounds)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        v = x[todo]
        left, right = v >> np.uint64(half), v & lo_mask
        for k in keys:
            left, right = right, left ^ _mix(right, k, lo_mask)
        v = (left << np.uint64(half)) | right
        x[todo] = v
        todo[todo] = v >= np.uint64(n)  # cycle-walk the ones that left the domain
    return x


def stride_schedule(counts: np.ndarray, weights: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources of the next ``m`` samples of a weighted mixture, and the new counts.

    Deterministic stride scheduling: the next sample comes from the source minimising
    ``(count + 1) / weight`` (ties to the lower index). Over any prefix each source's
    count is within one of ``weight * total``.
    """
    c = counts.astype(np.float64).copy()
    out = np.empty(m, dtype=np.int64)
    inv = 1.0 / weights
    for k in range(m):
        s = int(np.argmin((c + 1.0) * inv))
        out[k] = s
        c[s] += 1
    return out, c.astype(np.int64)
