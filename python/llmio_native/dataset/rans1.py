"""Batched decoding of ``rans1`` chunks: the GPU decoder and its host emulation.

The codec itself is C++ (``llmio_native._core.Rans1Model``, csrc/codec/rans1.hpp): a
``Rans1Model`` encodes and decodes one chunk on the CPU. Batches use the descriptors of
``rans`` (:func:`llmio_native.dataset.rans.descriptors`: the same chunk and block tables,
one block per 32768 tokens, payloads 4-byte aligned) and the same per-chunk status codes
(:data:`STATUS`, checked by :func:`check_status`); only the kernel differs
(csrc/cuda/rans1_decode.cu: lane ``l`` of a warp decodes the ``l``-th contiguous segment
of its block, with the previous token of its segment as context).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._native import _core
from . import rans as _rans
from .rans import BLOCK_DESC, BLOCK_SYMBOLS, CHUNK_DESC, PAYLOAD_ALIGN, STATUS, check_status, descriptors

__all__ = ["BLOCK_DESC", "BLOCK_SYMBOLS", "CHUNK_DESC", "PAYLOAD_ALIGN", "STATUS", "GpuDecoder", "check_status",
           "descriptors", "emulate"]


def emulate(src: np.ndarray, chunks: np.ndarray, blocks: np.ndarray, models: Sequence[Any],
            out: np.ndarray) -> np.ndarray:
    """Run the rans1 GPU decoder's logic on the host; returns the per-chunk status codes.

    Args:
        src: the payloads (uint8), each at the 4-byte aligned offset its descriptor names.
        chunks, blocks: tables from :func:`descriptors`.
        models: the ``Rans1Model`` objects the chunks' ``model`` field indexes.
        out: contiguous uint16/uint32 array receiving the tokens.

    Raises:
        ValueError: a model is not a ``Rans1Model``, or a descriptor points outside ``src`` or
            ``out``, names a missing model or chunk, or a payload's address is not 4-byte aligned
            (``rans::check_descriptors``, the check the CUDA binding makes; the message names the
            chunk and the value).
    """
    for i, m in enumerate(models):
        if not isinstance(m, _core.Rans1Model):
            raise ValueError(f"rans1 emulate: model {i} is a {type(m).__name__}, not a Rans1Model")
    images = [m.device_image() for m in models]
    return _core.rans1_emulate_gpu(np.ascontiguousarray(src, dtype=np.uint8), chunks, blocks, images, out)


class GpuDecoder(_rans.GpuDecoder):
    """Launches the rans1 kernel; keeps each model's decode image on the GPU once.

    The interface is :class:`llmio_native.dataset.rans.GpuDecoder`'s (``decode`` takes
    ``Rans1Model`` objects).

    Args:
        device: the CUDA device (a ``torch.device`` or string).

    Raises:
        UnsupportedError: ``llmio_native._cuda`` is not built, or it sees no usable device.
    """

    _KERNEL = "rans1_decode"
