"""
llmio_native CUDA kernels (decode, window cutting, quantization)
"""
from __future__ import annotations
import typing
import typing_extensions
__all__: list[str] = ['INT8_DTYPES', 'QUANT_BLOCK', 'cut_windows', 'device_count', 'device_count_error', 'driver_version', 'int8_block_absmax', 'int8_dequant_sum_requant', 'int8_dequant_sum_requant_shared', 'int8_quantize_pack', 'int8_quantize_pack_shared', 'int8_unpack_dequantize', 'rans1_decode', 'rans_decode', 'runtime_version']
def cut_windows(tokens_dev: typing.SupportsInt | typing.SupportsIndex, token_bytes: typing.SupportsInt | typing.SupportsIndex, num_tokens: typing.SupportsInt | typing.SupportsIndex, starts_dev: typing.SupportsInt | typing.SupportsIndex, batch: typing.SupportsInt | typing.SupportsIndex, seq_len: typing.SupportsInt | typing.SupportsIndex, x_dev: typing.SupportsInt | typing.SupportsIndex, y_dev: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Launch cut_windows_kernel on `stream` (an integer cudaStream_t; 0 = the default stream). Device pointers as integers.
    
    Raises:
        ValueError: token_bytes not 2 or 4, or more than 65535 windows.
        CudaError: the launch failed.
    """
def device_count() -> int:
    """
    Number of usable CUDA devices; 0 without a driver or GPU.
    """
def device_count_error() -> str:
    """
    Why device_count() is 0, or an empty string.
    """
def driver_version() -> int:
    ...
def int8_block_absmax(x: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, residual: typing.SupportsInt | typing.SupportsIndex, absmax: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Deterministic mode: per-block absmax of x + residual (+inf for a non-finite block).
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
        CudaError: the launch failed.
    """
def int8_dequant_sum_requant(recv: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, residual: typing.SupportsInt | typing.SupportsIndex, own: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Kernel (b): world packed copies of the owned shard -> fp32 rank-order sum / world + residual ([shard], updated) -> requantized packed shard `own`.
    
    Raises:
        ValueError: bad sizes or alignment.
        CudaError: the launch failed.
    """
def int8_dequant_sum_requant_shared(recv_codes: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, shared_scales: typing.SupportsInt | typing.SupportsIndex, residual: typing.SupportsInt | typing.SupportsIndex, own: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Deterministic kernel (b): int32 sum of the world code copies * shared scale / world + residual, requantized into the packed shard `own`.
    
    Raises:
        ValueError: bad sizes or alignment.
        CudaError: the launch failed.
    """
def int8_quantize_pack(x: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing.SupportsInt | typing.SupportsIndex, send: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Kernel (a): x (n values, dtype code) + residual ([n_pad] fp32, updated) -> send [world][shard + 4*shard/256] (each rank's shard codes, then its scales).
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
        CudaError: the launch failed.
    """
def int8_quantize_pack_shared(x: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, n_pad: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, residual: typing.SupportsInt | typing.SupportsIndex, absmax: typing.SupportsInt | typing.SupportsIndex, send: typing.SupportsInt | typing.SupportsIndex, scales: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Deterministic kernel (a): shared block scales from the all-reduced absmax; codes only into send [world][shard], the scales used into scales [n_pad/256].
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
        CudaError: the launch failed.
    """
def int8_unpack_dequantize(gathered: typing.SupportsInt | typing.SupportsIndex, world: typing.SupportsInt | typing.SupportsIndex, shard: typing.SupportsInt | typing.SupportsIndex, out: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Kernel (c): the gathered packed shards -> out[:n] in place, in the bucket's dtype.
    
    Raises:
        ValueError: bad sizes, dtype or alignment.
        CudaError: the launch failed.
    """
def rans1_decode(src: typing.SupportsInt | typing.SupportsIndex, chunks: typing.SupportsInt | typing.SupportsIndex, num_chunks: typing.SupportsInt | typing.SupportsIndex, blocks: typing.SupportsInt | typing.SupportsIndex, num_blocks: typing.SupportsInt | typing.SupportsIndex, images: typing.SupportsInt | typing.SupportsIndex, out: typing.SupportsInt | typing.SupportsIndex, token_bytes: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex, *, src_nbytes: typing.SupportsInt | typing.SupportsIndex, chunks_host: typing_extensions.Buffer, blocks_host: typing_extensions.Buffer, num_images: typing.SupportsInt | typing.SupportsIndex, out_tokens: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Launch the rans1 decoder on `stream` (a cudaStream_t as an integer; 0 is torch's default stream): one warp per block descriptor; per-chunk status codes (0 = decoded) are written to `status` (zeroed by the caller). Device pointers as integers. The keyword arguments describe the buffers for the descriptor check made before the launch (ValueError naming the chunk): src size in bytes, the host copies of the chunk and block tables, the number of model images and the output size in tokens.
    """
def rans_decode(src: typing.SupportsInt | typing.SupportsIndex, chunks: typing.SupportsInt | typing.SupportsIndex, num_chunks: typing.SupportsInt | typing.SupportsIndex, blocks: typing.SupportsInt | typing.SupportsIndex, num_blocks: typing.SupportsInt | typing.SupportsIndex, images: typing.SupportsInt | typing.SupportsIndex, out: typing.SupportsInt | typing.SupportsIndex, token_bytes: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex, *, src_nbytes: typing.SupportsInt | typing.SupportsIndex, chunks_host: typing_extensions.Buffer, blocks_host: typing_extensions.Buffer, num_images: typing.SupportsInt | typing.SupportsIndex, out_tokens: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Launch the rans decoder on `stream` (a cudaStream_t as an integer; 0 is torch's default stream): one warp per block descriptor; per-chunk status codes (0 = decoded) are written to `status` (zeroed by the caller). Device pointers as integers. The keyword arguments describe the buffers for the descriptor check made before the launch (ValueError naming the chunk): src size in bytes, the host copies of the chunk and block tables, the number of model images and the output size in tokens.
    """
def runtime_version() -> int:
    ...
INT8_DTYPES: dict = {'float32': 0, 'bfloat16': 1, 'float16': 2}
QUANT_BLOCK: int = 256
