"""
llmio_native native core: read engines, pinned ring, codecs, CPU oracles and kernel emulations
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
import typing_extensions
__all__: list[str] = ['CUT_MAX_BATCH', 'CodecError', 'CudaError', 'HAVE_URING', 'HostBuffer', 'INT8_DTYPES', 'QUANT_BLOCK', 'RANS1_CTX_BITS_DEFAULT', 'RANS1_SCALE_BITS_DEFAULT', 'RANS_BLOCK_DESC', 'RANS_BLOCK_SYMBOLS', 'RANS_CHUNK_DESC', 'RANS_LANES', 'RANS_MAX_SCALE_BITS', 'RANS_MIN_SCALE_BITS', 'RANS_PAYLOAD_ALIGN', 'RANS_SCALE_BITS_DEFAULT', 'RANS_STATUS', 'RANS_STATUS_BAD_FINAL', 'RANS_STATUS_BAD_HEADER', 'RANS_STATUS_BAD_STATE', 'RANS_STATUS_BAD_SYMBOL', 'RANS_STATUS_OK', 'RANS_STATUS_OVERRUN', 'Rans1Model', 'RansModel', 'Reader', 'ResourceError', 'RingSlot', 'ShortReadError', 'SlotRing', 'UnsupportedError', 'Writer', 'block_absmax_ref', 'cut_windows_emulate', 'cut_windows_ref', 'dequant_sum_requant_ref', 'dequant_sum_requant_shared_ref', 'dequantize_blocks_ref', 'feistel_permute', 'fsync_path', 'host_live_bytes', 'host_live_count', 'int8_block_absmax_emulate', 'int8_block_absmax_fast', 'int8_dequant_sum_requant_emulate', 'int8_dequant_sum_requant_fast', 'int8_dequant_sum_requant_shared_emulate', 'int8_dequant_sum_requant_shared_fast', 'int8_fast_isa', 'int8_fast_isas', 'int8_fast_set_isa', 'int8_fast_set_threads', 'int8_fast_threads', 'int8_quantize_pack_emulate', 'int8_quantize_pack_fast', 'int8_quantize_pack_shared_emulate', 'int8_quantize_pack_shared_fast', 'int8_unpack_dequantize_emulate', 'int8_unpack_dequantize_fast', 'probe_io_uring', 'quantize_blocks_ref', 'quantize_blocks_shared_ref', 'rans1_emulate_gpu', 'rans_emulate_gpu', 'rans_simd_levels', 'staging_pool_enter', 'staging_pool_exit', 'staging_pool_stats']
class UnsupportedError(RuntimeError):
    pass
class ShortReadError(OSError):
    pass
class CudaError(RuntimeError):
    pass
class ResourceError(OSError):
    pass
class Reader:
    def __init__(self, paths: collections.abc.Sequence[str], backend: str, direct: bool = True, queue_depth: typing.SupportsInt | typing.SupportsIndex = 64, num_threads: typing.SupportsInt | typing.SupportsIndex = 16, max_io_bytes: typing.SupportsInt | typing.SupportsIndex = 1048576) -> None:
        ...
    def alignment(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def direct_active(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def file_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def path(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> str:
        ...
    def read(self, i: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, nbytes: typing.SupportsInt | typing.SupportsIndex) -> numpy.ndarray:
        ...
    def read_batch(self, requests: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]]) -> list:
        ...
    def read_batch_ptr(self, requests: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]]) -> None:
        ...
    def read_into(self, i: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, buf: typing.Any) -> int:
        ...
    def read_many(self, files: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], nbytes: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], out: typing.Any, out_offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
        ...
    def stats(self) -> dict:
        ...
    @property
    def backend(self) -> str:
        ...
    @property
    def num_files(self) -> int:
        ...
class Writer:
    def __init__(self, path: str, backend: str, direct: bool = True, queue_depth: typing.SupportsInt | typing.SupportsIndex = 32, chunk_bytes: typing.SupportsInt | typing.SupportsIndex = 4194304, staging_bytes: typing.SupportsInt | typing.SupportsIndex = 67108864, exclusive: bool = False) -> None:
        ...
    def abort(self) -> None:
        ...
    def close(self, sync: str = 'data') -> None:
        ...
    def flush(self) -> None:
        ...
    def stats(self) -> dict:
        ...
    def tell(self) -> int:
        ...
    def write(self, data: typing.Any) -> int:
        """
        Append a C-contiguous buffer; returns the file offset it starts at.
        """
    def write_ptr(self, ptr: typing.SupportsInt | typing.SupportsIndex, nbytes: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    @property
    def alignment(self) -> int:
        ...
    @property
    def backend(self) -> str:
        ...
    @property
    def chunk_bytes(self) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def direct_active(self) -> bool:
        ...
    @property
    def path(self) -> str:
        ...
class RingSlot:
    def array(self, k: typing.SupportsInt | typing.SupportsIndex) -> numpy.ndarray:
        """
        numpy uint8 view of request k's bytes (no copy)
        """
    def release(self, fence: typing.Any = None) -> None:
        """
        Give the slot back to the ring (idempotent). With a fence (a torch.cuda.Event: query() -> bool, synchronize()) the slot is reused only once the fence completed.
        """
    @property
    def index(self) -> int:
        ...
    @property
    def nbytes(self) -> list[int]:
        ...
    @property
    def offsets(self) -> list[int]:
        ...
    @property
    def ptr(self) -> int:
        ...
    @property
    def released(self) -> bool:
        ...
    @property
    def seq(self) -> int:
        ...
    @property
    def tag(self) -> int:
        ...
    @property
    def used(self) -> int:
        ...
class SlotRing:
    def __init__(self, reader: Reader, num_slots: typing.SupportsInt | typing.SupportsIndex, slot_bytes: typing.SupportsInt | typing.SupportsIndex, num_producers: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def close(self) -> None:
        """
        Stop and join the producers, then synchronize pending fences and free their slots.
        """
    def get(self, timeout: typing.Any = None) -> typing.Any:
        """
        Next filled slot in submission order; None if timeout (seconds) passes first.
        """
    def poll(self) -> int:
        """
        Free the slots released behind fences that completed; returns how many.
        """
    def required_bytes(self, requests: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], packed: bool = False) -> int:
        ...
    def stats(self) -> dict:
        ...
    def submit(self, tag: typing.SupportsInt | typing.SupportsIndex, requests: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], packed: bool = False) -> int:
        ...
    @property
    def arena_bytes(self) -> int:
        ...
    @property
    def arena_ptr(self) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def held(self) -> int:
        ...
    @property
    def huge_pages(self) -> bool:
        ...
    @property
    def num_slots(self) -> int:
        ...
    @property
    def pending(self) -> int:
        ...
    @property
    def releasing(self) -> int:
        ...
    @property
    def slot_bytes(self) -> int:
        ...
class HostBuffer:
    def __init__(self, nbytes: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def huge_pages(self) -> bool:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def ptr(self) -> int:
        ...
class CodecError(ValueError):
    pass
class RansModel:
    """
    Frequency model of the rans token codec (csrc/codec/rans.hpp).
    """
    @staticmethod
    def build(parts: collections.abc.Sequence[typing_extensions.Buffer], token_bytes: typing.SupportsInt | typing.SupportsIndex, scale_bits: typing.SupportsInt | typing.SupportsIndex = 14, escape_max_count: typing.SupportsInt | typing.SupportsIndex = 0) -> RansModel:
        """
        Model of the tokens in `parts` (1-D uint16/uint32 arrays).
        """
    @staticmethod
    def parse(data: typing_extensions.Buffer) -> RansModel:
        """
        Parse serialize()'s bytes; raises CodecError when they are malformed.
        """
    def decode(self, payload: typing_extensions.Buffer, out: typing_extensions.Buffer, simd: bool = True) -> None:
        """
        Decode a payload into `out` (its length is the token count); raises CodecError when corrupt.
        """
    def device_image(self) -> numpy.typing.NDArray[numpy.uint32]:
        ...
    def encode(self, tokens: typing_extensions.Buffer) -> bytes:
        """
        Encode a chunk of tokens into a payload (bytes).
        """
    def serialize(self) -> bytes:
        ...
    @property
    def bits_per_token(self) -> float:
        """
        Expected coded bits per token under the model's frequencies.
        """
    @property
    def freq(self) -> numpy.typing.NDArray[numpy.uint32]:
        ...
    @property
    def num_rank_buckets(self) -> int:
        ...
    @property
    def num_symbols(self) -> int:
        ...
    @property
    def scale_bits(self) -> int:
        ...
    @property
    def token_bytes(self) -> int:
        ...
class Rans1Model:
    """
    Context model of the rans1 token codec (csrc/codec/rans1.hpp).
    """
    @staticmethod
    def build(parts: collections.abc.Sequence[typing_extensions.Buffer], token_bytes: typing.SupportsInt | typing.SupportsIndex, scale_bits: typing.SupportsInt | typing.SupportsIndex = 12, ctx_bits: typing.SupportsInt | typing.SupportsIndex = 11, min_count: typing.SupportsInt | typing.SupportsIndex = 2, exact_min_count: typing.SupportsInt | typing.SupportsIndex = 16, max_exact: typing.SupportsInt | typing.SupportsIndex = 32767, entry_cost_bits: typing.SupportsInt | typing.SupportsIndex = 16, max_slots: typing.SupportsInt | typing.SupportsIndex = 33554432) -> Rans1Model:
        """
        Model of the tokens in `parts` (1-D uint16/uint32 arrays, each a chunk as encode() will see it).
        """
    @staticmethod
    def parse(data: typing_extensions.Buffer) -> Rans1Model:
        """
        Parse serialize()'s bytes; raises CodecError when they are malformed.
        """
    def decode(self, payload: typing_extensions.Buffer, out: typing_extensions.Buffer, reference: bool = False, simd: typing.Any = True) -> None:
        """
        Decode a payload into `out` (its length is the token count); raises CodecError when corrupt. reference=True runs the reference decoder (the oracle of the tests). simd picks the instruction set of the default path, bit-identical at every level: True the best the CPU has (AVX-512, AVX2, scalar) capped by LLMIO_RANS_SIMD (0/scalar, avx2, avx512); False its scalar code; 'scalar', 'avx2', 'avx512' or 'auto' by name, raising UnsupportedError where the CPU lacks that level and ValueError for another name.
        """
    def device_image(self) -> numpy.typing.NDArray[numpy.uint32]:
        ...
    def encode(self, tokens: typing_extensions.Buffer) -> bytes:
        """
        Encode a chunk of tokens into a payload (bytes).
        """
    def serialize(self) -> bytes:
        ...
    @property
    def bits_per_token(self) -> float:
        """
        Expected coded bits per token of the modelled data under the quantised frequencies.
        """
    @property
    def ctx_bits(self) -> int:
        ...
    @property
    def num_contexts(self) -> int:
        ...
    @property
    def num_entries(self) -> int:
        ...
    @property
    def num_exact(self) -> int:
        ...
    @property
    def num_slots(self) -> int:
        ...
    @property
    def num_symbols(self) -> int:
        ...
    @property
    def scale_bits(self) -> int:
        ...
    @property
    def token_bytes(self) -> int:
        ...
def _faults() -> str:
    ...
def _set_faults(arg0: str) -> None:
    """
    Test-only fault injection (see csrc/io/file.hpp).
    """
def block_absmax_ref(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], residual: typing.Any, absmax: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Per-block absmax of x + residual (residual read only; +inf for a block with inf/NaN).
    """
def cut_windows_emulate(tokens: typing_extensions.Buffer, starts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], seq_len: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
    """
    Host emulation of cut_windows_kernel (its per-thread code over the launch grid), same arguments and result as cut_windows_ref.
    
    Raises:
        ValueError: as cut_windows_ref, or more than CUT_MAX_BATCH windows.
    """
def cut_windows_ref(tokens: typing_extensions.Buffer, starts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], seq_len: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
    """
    CPU oracle of cut_windows_kernel: x[b,t]=tokens[starts[b]+t], y=x shifted by one, int64.
    
    Raises:
        ValueError: tokens not a 1-D uint16/uint32 array, seq_len < 1, or a window past the end.
    """
def dequant_sum_requant_ref(codes_w: typing.Annotated[numpy.typing.ArrayLike, numpy.int8], scales_w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], residual: typing.Any, codes: numpy.typing.NDArray[numpy.int8], scales: numpy.typing.NDArray[numpy.float32]) -> None:
    ...
def dequant_sum_requant_shared_ref(codes_w: typing.Annotated[numpy.typing.ArrayLike, numpy.int8], shared_scales: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], residual: typing.Any, codes: numpy.typing.NDArray[numpy.int8], scales: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Owner step with shared scales: int32 sum of the W codes, * scale / W + residual, requantized.
    """
def dequantize_blocks_ref(codes: typing.Annotated[numpy.typing.ArrayLike, numpy.int8], scales: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], out: numpy.typing.NDArray[numpy.float32]) -> None:
    ...
def feistel_permute(idx: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], n: typing.SupportsInt | typing.SupportsIndex, key: typing.SupportsInt | typing.SupportsIndex, rounds: typing.SupportsInt | typing.SupportsIndex = 6) -> numpy.typing.NDArray[numpy.int64]:
    """
    Seeded bijection of [0, n) applied to idx (int64); see csrc/loader/permute.hpp.
    """
def fsync_path(path: str, data_only: bool = False) -> None:
    """
    open + fsync (fdatasync when data_only) of a file or a directory; OSError naming the path.
    """
def host_live_bytes() -> int:
    """
    Bytes mapped by live host buffers and ring arenas
    """
def host_live_count() -> int:
    ...
def int8_block_absmax_emulate(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, absmax: typing_extensions.Buffer) -> None:
    """
    Host emulation of _cuda.int8_block_absmax.
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def int8_block_absmax_fast(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, absmax: typing_extensions.Buffer) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_block_absmax.
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def int8_dequant_sum_requant_emulate(recv: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, own: typing_extensions.Buffer) -> None:
    """
    Host emulation of _cuda.int8_dequant_sum_requant.
    
    Raises:
        ValueError: bad sizes or alignment.
    """
def int8_dequant_sum_requant_fast(recv: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, own: typing_extensions.Buffer) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_dequant_sum_requant.
    
    Raises:
        ValueError: bad sizes or alignment.
    """
def int8_dequant_sum_requant_shared_emulate(recv_codes: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, shared_scales: typing_extensions.Buffer, residual: typing_extensions.Buffer, own: typing_extensions.Buffer) -> None:
    """
    Host emulation of _cuda.int8_dequant_sum_requant_shared.
    
    Raises:
        ValueError: bad sizes or alignment.
    """
def int8_dequant_sum_requant_shared_fast(recv_codes: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, shared_scales: typing_extensions.Buffer, residual: typing_extensions.Buffer, own: typing_extensions.Buffer) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_dequant_sum_requant_shared.
    
    Raises:
        ValueError: bad sizes or alignment.
    """
def int8_fast_isa() -> str:
    """
    The level the fast INT8 path uses now (the best supported, or LLMIO_INT8_ISA / int8_fast_set_isa).
    
    Raises:
        ValueError: LLMIO_INT8_ISA names an unknown level or one this CPU lacks.
    """
def int8_fast_isas() -> list:
    """
    Levels of the fast INT8 path this CPU runs, scalar first (e.g. ['scalar', 'avx2', 'avx512']).
    """
def int8_fast_set_isa(name: str) -> str:
    """
    Forces the fast INT8 path's level ('scalar', 'avx2', 'avx512'); returns the previous one.
    
    Raises:
        ValueError: an unknown level, or one this CPU cannot run.
    """
def int8_fast_set_threads(n: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Sets the fast INT8 path's thread count (1..64); returns the previous one.
    
    Raises:
        ValueError: n outside 1..64.
    """
def int8_fast_threads() -> int:
    """
    Threads the fast INT8 path uses for a large call (LLMIO_INT8_THREADS, else min(cores, 4)).
    """
def int8_quantize_pack_emulate(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, send: typing_extensions.Buffer) -> None:
    """
    Host emulation of _cuda.int8_quantize_pack on host arrays (x: float32, or the bits of bfloat16 / float16 as 2-byte items).
    
    Raises:
        ValueError: bad sizes, dtype or alignment (as the kernel's binding).
    """
def int8_quantize_pack_fast(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, send: typing_extensions.Buffer) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_quantize_pack on host arrays (x: float32, or the bits of bfloat16 / float16 as 2-byte items).
    
    Raises:
        ValueError: bad sizes, dtype or alignment (as the kernel's binding).
    """
def int8_quantize_pack_shared_emulate(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, absmax: typing_extensions.Buffer, send: typing_extensions.Buffer, scales: typing_extensions.Buffer) -> None:
    """
    Host emulation of _cuda.int8_quantize_pack_shared.
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def int8_quantize_pack_shared_fast(x: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing_extensions.Buffer, absmax: typing_extensions.Buffer, send: typing_extensions.Buffer, scales: typing_extensions.Buffer) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_quantize_pack_shared.
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def int8_unpack_dequantize_emulate(gathered: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, out: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Host emulation of _cuda.int8_unpack_dequantize (out: float32, or 2-byte items for bfloat16 / float16).
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def int8_unpack_dequantize_fast(gathered: typing_extensions.Buffer, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, out: typing_extensions.Buffer, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle) of _cuda.int8_unpack_dequantize (out: float32, or 2-byte items for bfloat16 / float16).
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
    """
def probe_io_uring() -> dict:
    """
    io_uring usability on this kernel: compiled, usable, errno, reason
    """
def quantize_blocks_ref(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], residual: typing.Any, codes: numpy.typing.NDArray[numpy.int8], scales: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Blockwise INT8 quantization with error feedback, in place into codes/scales (and residual).
    """
def quantize_blocks_shared_ref(x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], residual: typing.Any, absmax: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], codes: numpy.typing.NDArray[numpy.int8], scales: numpy.typing.NDArray[numpy.float32]) -> None:
    """
    Blockwise INT8 quantization with the shared (all-reduced MAX) block absmax, in place.
    """
def rans1_emulate_gpu(src: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], chunks: numpy.ndarray, blocks: numpy.ndarray, images: collections.abc.Sequence[typing.Annotated[numpy.typing.ArrayLike, numpy.uint32]], out: typing_extensions.Buffer) -> numpy.typing.NDArray[numpy.int32]:
    """
    Host emulation of the CUDA rans1 decoder (the rans descriptors); returns per-chunk status codes.
    """
def rans_emulate_gpu(src: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], chunks: numpy.ndarray, blocks: numpy.ndarray, images: collections.abc.Sequence[typing.Annotated[numpy.typing.ArrayLike, numpy.uint32]], out: typing_extensions.Buffer) -> numpy.typing.NDArray[numpy.int32]:
    """
    Host emulation of the CUDA rans decoder (same descriptors); returns per-chunk status codes.
    """
def rans_simd_levels() -> dict:
    """
    The CPU decoders' instruction-set levels: {'cpu': the levels this CPU runs, lowest first, 'default': what simd=True runs (the CPU's best capped by LLMIO_RANS_SIMD)}. Raises ValueError when LLMIO_RANS_SIMD holds another value than 0, scalar, avx2, avx512, auto or 1.
    """
def staging_pool_enter() -> None:
    """
    Open a scope of the Writer staging pool (io/staging_pool.hpp): Writers reuse idle arenas.
    """
def staging_pool_exit() -> None:
    """
    Close a scope; the last one unmaps every idle arena.
    """
def staging_pool_stats() -> dict:
    """
    Counters of the Writer staging pool: idle_bytes, idle_count, hits, misses, scopes, max_idle_bytes.
    """
CUT_MAX_BATCH: int = 65535
HAVE_URING: bool = True
INT8_DTYPES: dict = {'float32': 0, 'bfloat16': 1, 'float16': 2}
QUANT_BLOCK: int = 256
RANS1_CTX_BITS_DEFAULT: int = 11
RANS1_SCALE_BITS_DEFAULT: int = 12
RANS_BLOCK_DESC: dict = {'names': ['chunk', 'block'], 'formats': ['<u4', '<u4'], 'offsets': [0, 4], 'itemsize': 8}
RANS_BLOCK_SYMBOLS: int = 32768
RANS_CHUNK_DESC: dict = {'names': ['src_offset', 'src_bytes', 'out_offset', 'num_tokens', 'model'], 'formats': ['<u8', '<u8', '<u8', '<u4', '<u4'], 'offsets': [0, 8, 16, 24, 28], 'itemsize': 32}
RANS_LANES: int = 32
RANS_MAX_SCALE_BITS: int = 16
RANS_MIN_SCALE_BITS: int = 9
RANS_PAYLOAD_ALIGN: int = 4
RANS_SCALE_BITS_DEFAULT: int = 14
RANS_STATUS: dict = {0: 'ok', 1: 'payload header, block table or size inconsistent', 2: 'invalid initial state', 3: 'a block needs more words than it has', 4: 'a symbol the model does not have', 5: "final states or word count differ from the encoder's"}
RANS_STATUS_BAD_FINAL: int = 5
RANS_STATUS_BAD_HEADER: int = 1
RANS_STATUS_BAD_STATE: int = 2
RANS_STATUS_BAD_SYMBOL: int = 4
RANS_STATUS_OK: int = 0
RANS_STATUS_OVERRUN: int = 3
__version__: str = '0.1.0'
