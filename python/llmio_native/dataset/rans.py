"""Batched decoding of ``rans`` chunks: descriptors, the GPU decoder and its host emulation.

The codec itself is C++ (``llmio_native._core.RansModel``, csrc/codec/rans.hpp): a
``RansModel`` encodes and decodes one chunk on the CPU. This module decodes many chunks
at once the way the GPU does (csrc/cuda/rans_decode.cu): the payloads of the chunks lie
in one buffer, each at a 4-byte aligned offset; a chunk table (:data:`CHUNK_DESC`) says
where each payload is, how many tokens it holds, where its tokens go and which model it
uses; a block table (:data:`BLOCK_DESC`, one row per 32768 tokens) gives every warp its
block. :func:`emulate` runs the kernel's logic on the host (the tests compare it with the
C++ decoder); :class:`GpuDecoder` launches the kernel on the current CUDA stream.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .. import _native
from .._native import _core, _cuda
from ..errors import FormatError

BLOCK_SYMBOLS: int = _core.RANS_BLOCK_SYMBOLS
# Descriptor layouts and status codes are defined once in C++ (csrc/codec) and exported.
CHUNK_DESC = np.dtype(_core.RANS_CHUNK_DESC)
BLOCK_DESC = np.dtype(_core.RANS_BLOCK_DESC)
PAYLOAD_ALIGN: int = _core.RANS_PAYLOAD_ALIGN

#: Per-chunk status codes of the kernel and the emulation (rans_device.hpp).
STATUS: dict[int, str] = dict(_core.RANS_STATUS)


def descriptors(src_offsets: Sequence[int] | np.ndarray, src_bytes: Sequence[int] | np.ndarray,
                num_tokens: Sequence[int] | np.ndarray, models: Sequence[int] | np.ndarray,
                out_offsets: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chunk and block tables for a batched decode (vectorised: no per-token work).

    Args:
        src_offsets: byte offset of each payload in the source buffer (multiples of 4).
        src_bytes: payload sizes.
        num_tokens: tokens each chunk decodes to (from the chunk table).
        models: index of each chunk's model in the image list.
        out_offsets: first output token of each chunk (default: packed in order).

    Returns:
        ``(chunks, blocks)`` structured arrays of :data:`CHUNK_DESC` and :data:`BLOCK_DESC`.

    Raises:
        ValueError: lengths differ or an offset is not a multiple of 4.
    """
    so = np.asarray(src_offsets, dtype=np.uint64)
    n = len(so)
    nt = np.asarray(num_tokens, dtype=np.uint64)
    if not (len(src_bytes) == len(nt) == len(models) == n) or (out_offsets is not None and len(out_offsets) != n):
        raise ValueError("rans descriptors: every argument needs one value per chunk")
    if n and (so % np.uint64(PAYLOAD_ALIGN)).any():
        raise ValueError("rans descriptors: payloads must start at 4-byte aligned offsets")
    chunks = np.zeros(n, dtype=CHUNK_DESC)
    chunks["src_offset"] = so
    chunks["src_bytes"] = np.asarray(src_bytes, dtype=np.uint64)
    chunks["num_tokens"] = nt
    chunks["model"] = np.asarray(models, dtype=np.uint32)
    if out_offsets is None:
        chunks["out_offset"] = np.concatenate([[0], np.cumsum(nt)[:-1]]).astype(np.uint64) if n else 0
    else:
        chunks["out_offset"] = np.asarray(out_offsets, dtype=np.uint64)
    nb = (nt.astype(np.int64) + BLOCK_SYMBOLS - 1) // BLOCK_SYMBOLS
    blocks = np.zeros(int(nb.sum()), dtype=BLOCK_DESC)
    blocks["chunk"] = np.repeat(np.arange(n, dtype=np.uint32), nb)
    starts = np.concatenate([[0], np.cumsum(nb)[:-1]]) if n else np.zeros(0, np.int64)
    blocks["block"] = np.arange(len(blocks), dtype=np.int64) - np.repeat(starts, nb)
    return chunks, blocks


def emulate(src: np.ndarray, chunks: np.ndarray, blocks: np.ndarray, models: Sequence[Any],
            out: np.ndarray) -> np.ndarray:
    """Run the GPU decoder's logic on the host; returns the per-chunk status codes.

    Raises:
        ValueError: a descriptor points outside ``src`` or ``out``, names a missing model or
            chunk, or a payload's address is not 4-byte aligned (``rans::check_descriptors``,
            the check the CUDA binding makes; the message names the chunk and the value).
    """
    images = [m.device_image() for m in models]
    return _core.rans_emulate_gpu(np.ascontiguousarray(src, dtype=np.uint8), chunks, blocks, images, out)


def check_status(status: np.ndarray, where: Sequence[str] | Callable[[int], str],
                 attrs: Callable[[int], dict] | None = None) -> None:
    """Raise FormatError naming the first chunk whose status is not 0.

    ``where[i]`` (or ``where(i)``) describes chunk ``i`` of the batch (file, chunk, offset);
    ``attrs(i)``, when given, sets the error's ``path``/``chunk``/``offset``.

    Raises:
        FormatError: with the description, the reason and the status code.
    """
    status = np.asarray(status)
    bad = np.flatnonzero(status != 0)
    if len(bad):
        i = int(bad[0])
        code = int(status[i])
        text = where(i) if callable(where) else where[i]
        raise FormatError(f"{text}: rans decode failed on the GPU: {STATUS.get(code, code)} "
                          f"(status {code}; {len(bad)} bad chunk(s) in this batch)", **(attrs(i) if attrs else {}))


class GpuDecoder:
    """Launches the rans kernel; keeps each model's device image on the GPU once.

    Args:
        device: the CUDA device (a ``torch.device`` or string).

    Raises:
        UnsupportedError: ``llmio_native._cuda`` is not built, or it sees no usable device
            (e.g. the NVIDIA driver is older than the CUDA runtime it was built with needs,
            even where torch itself sees a GPU); the message says why.
    """

    def __init__(self, device: Any) -> None:
        import torch

        from ..errors import UnsupportedError

        usable, why = _native.cuda_usable()
        if not usable:
            raise UnsupportedError(f"rans GPU decoder: {why}")
        if not torch.cuda.is_available():
            raise UnsupportedError("rans GPU decoder: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UnsupportedError(f"rans GPU decoder: device must be a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._images: dict[int, Any] = {}  # id(model) -> (model, device tensor)

    #: The ``_cuda`` launcher this decoder calls (rans1.GpuDecoder: ``rans1_decode``).
    _KERNEL = "rans_decode"

    def image_ptr(self, model: Any) -> int:
        """Device address of ``model``'s decode image (uploaded on first use)."""
        import torch

        ent = self._images.get(id(model))
        if ent is None:
            img = torch.from_numpy(model.device_image()).to(self.device)
            ent = self._images[id(model)] = (model, img)
        return int(ent[1].data_ptr())

    def decode(self, src: Any, chunks: np.ndarray, blocks: np.ndarray, models: Sequence[Any], out: Any,
               stream: Any = None) -> Any:
        """Decode on ``stream`` (default: the current stream; torch's default stream is fine)
        into ``out`` (a device tensor of int16/int32 viewed as the token type). Returns the
        device status tensor; nothing synchronises here: check it with :func:`check_status`
        after the stream is done.

        Args:
            src: contiguous uint8 device tensor holding the payloads (``chunks["src_offset"]``
                is relative to its first byte; each payload 4-byte aligned in memory).
            chunks: :data:`CHUNK_DESC` table (host).
            blocks: :data:`BLOCK_DESC` table (host).
            models: the models the chunks' ``model`` field indexes.
            out: contiguous 2- or 4-byte device tensor receiving the tokens.
            stream: a ``torch.cuda.Stream`` on the decoder's device, or None.

        Raises:
            ValueError: a tensor is not on the decoder's device or not contiguous, ``out``'s
                element size differs from the models' token size, or a descriptor lies outside
                ``src``/``out``, names a missing model or a misaligned payload (the message names
                the chunk and the value; checked before anything is launched).
            CudaError: the launch failed.
        """
        import torch

        for name, t in (("src", src), ("out", out)):
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"rans GpuDecoder: {name} must be a tensor on {self.device}, got {where}")
            if not t.is_contiguous():
                raise ValueError(f"rans GpuDecoder: {name} must be contiguous")
        if stream is None:
            stream = torch.cuda.current_stream(self.device)
        elif stream.device != self.device:
            raise ValueError(f"rans GpuDecoder: stream is on {stream.device}, the decoder on {self.device}")
        tb = out.element_size()
        for i, m in enumerate(models):
            if int(m.token_bytes) != tb:
                raise ValueError(f"rans GpuDecoder: model {i} is for {m.token_bytes}-byte tokens, "
                                 f"out has {tb}-byte elements")
        chunks = np.ascontiguousarray(chunks, dtype=CHUNK_DESC)
        blocks = np.ascontiguousarray(blocks, dtype=BLOCK_DESC)
        with torch.cuda.stream(stream):
            ptrs = torch.tensor([self.image_ptr(m) for m in models] or [0], dtype=torch.int64)
            ptrs = ptrs.pin_memory().to(self.device, non_blocking=True)
            cd = torch.from_numpy(chunks.view(np.uint8)).pin_memory().to(self.device, non_blocking=True)
            bd = torch.from_numpy(blocks.view(np.uint8)).pin_memory().to(self.device, non_blocking=True)
            status = torch.zeros(max(1, len(chunks)), dtype=torch.int32, device=self.device)
            getattr(_cuda, self._KERNEL)(src.data_ptr(), cd.data_ptr(), len(chunks), bd.data_ptr(), len(blocks),
                              ptrs.data_ptr(), out.data_ptr(), tb, status.data_ptr(), stream.cuda_stream,
                              src_nbytes=src.numel() * src.element_size(), chunks_host=chunks,
                              blocks_host=blocks, num_images=len(models), out_tokens=out.numel())
            for t in (ptrs, cd, bd):
                t.record_stream(stream)
        return status[: len(chunks)]
