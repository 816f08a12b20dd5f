"""Kernel "cuda_prefill": hand-written Hopper (sm_90a) W4A16 / W8A16 GEMM for any M.

What it computes: y[M, N] = x[M, K] @ dequant(W)^T (+ bias) in one launch of
csrc/prefill_gemm.cu: wgmma.mma_async with the weight dequantized in registers as the A
operand (the decode layout's lane chunks are wgmma's A fragments) and x as the B operand in
shared memory (128-byte swizzle); a ring of stages, filled either by the computing threads
(cp.async) or by a third, copying warpgroup (``warp_specialized``: TMA and bulk copies from
one thread); the output staged through shared
memory for 16-byte stores when N % 8 == 0; optional deterministic split-K, or (warp-specialized
only) deterministic stream-K: about one block per SM, each an equal share of the (tile,
64-k stage) units, so layers with few tiles or a partial last wave keep every SM busy.
The same formats as cuda_decode: 4/8-bit codes, groups 32/64/128/256 or per-channel,
symmetric / zero points / offsets, fp16 / bf16 activations, act-order by one gather.

Prepared layout: exactly cuda_decode's (:class:`dqgemm.kernels.cuda_decode.DecodePrepared`,
built by :func:`dqgemm.kernels.cuda_decode.prepare_decode`); ``prepared_key`` makes the two
kernels share one cached copy per weight.

Tile choice (``m_tile`` tokens per block: 64, 128 or 256; ``n_tile`` channels per block:
128 or 256, 256 only with m_tile <= 128; ``warp_specialized``; ``k_splits`` blocks per
output tile along K, or ``stream_k``): the configuration measured
fastest for the layer shape (configs/cuda_prefill.json, "measured", written from the
sweep of bench/cuda_prefill_bench.py), else a cost model over whole waves of blocks whose
constants are data in the same file; ``prefill_matmul(..., m_tile=, k_splits=, n_tile=,
warp_specialized=, stream_k=)`` overrides both.

Constraints: compute capability 9.0 and an extension built for sm_90a (the default
DQGEMM_CUDA_ARCHS "80;90a"), fp16/bf16 activations, K % 8 == 0. Workspaces are cuda_decode's
(cached per device and stream, counters left at zero): CUDA-graph capturable after one
warm-up call, no host synchronization.

Test: pytest tests/test_cuda_prefill.py. Benchmark: python bench/cuda_prefill_bench.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Dict, Optional, Tuple

import torch

from .. import _ext, registry
from . import cuda_decode
from .cuda_decode import TILE_N, DecodePrepared, padded_sizes

M_TILES = (64, 128, 256)
N_TILES = (128, 256)    # channels per block; 256 only with m_tile <= 128 (registers)
STAGE_K = 64            # k per pipeline stage (csrc/prefill_gemm.cu, Config::kBK)
_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "cuda_prefill.json")


@dataclasses.dataclass(frozen=True)
class TileChoice:
    """One launch configuration: tokens and channels per block, blocks per output tile
    along K."""

    m_tile: int
    k_splits: int
    n_tile: int = 128
    warp_specialized: bool = False   # a copying warpgroup
    stream_k: bool = False           # one block per SM over all (tile, k stage) units

    def valid(self) -> bool:
        return (self.m_tile in M_TILES and self.n_tile in N_TILES and self.k_splits >= 1
                and not (self.n_tile == 256 and self.m_tile == 256)
                and (not self.stream_k or (self.warp_specialized and self.k_splits == 1
                                           and (self.m_tile, self.n_tile) != (128, 256))))

    @property
    def key(self) -> str:
        """Readable name of the block tile, e.g. '128x256ws' (m_tile x n_tile, ws =
        warp-specialized): the key of the cost model's tables."""
        return f"{self.m_tile}x{self.n_tile}{'ws' if self.warp_specialized else ''}"

    @property
    def label(self) -> str:
        """The whole configuration, e.g. '256x128ws/sk' (stream-K) or '128x128ws/2' (two k
        splits)."""
        return f"{self.key}/{'sk' if self.stream_k else self.k_splits}"


def all_choices(max_splits: int, stream_k: bool = True):
    """Every launch configuration with at most ``max_splits`` k splits, and (``stream_k``)
    the stream-K variant of every warp-specialized tile."""
    out = []
    for ws in (False, True):
        for n_tile in N_TILES:
            for m_tile in M_TILES:
                for splits in range(1, max_splits + 1):
                    choice = TileChoice(m_tile, splits, n_tile, ws)
                    if choice.valid():
                        out.append(choice)
                choice = TileChoice(m_tile, 1, n_tile, ws, stream_k=True)
                if stream_k and choice.valid():
                    out.append(choice)
    return out


def stream_k_grid(m: int, n: int, k: int, choice: TileChoice, sms: int) -> int:
    """Blocks of a stream-K launch: one per SM (every warp-specialized tile runs one block
    per SM), at most one per (tile, k stage) unit."""
    n_pad, k_pad = padded_sizes(n, k)
    tiles = math.ceil(n_pad / choice.n_tile) * math.ceil(m / choice.m_tile)
    return max(1, min(sms, tiles * (k_pad // STAGE_K)))


@functools.lru_cache(maxsize=None)
def _config() -> Dict:
    with open(_CONFIG_FILE) as f:
        return json.load(f)


def estimate_cost(m: int, n: int, k: int, choice: TileChoice, sms: int) -> float:
    """Relative time of ``choice`` (configs/cuda_prefill.json, "cost_model"): whole waves of
    blocks, each taking (stage overhead + m_tile) x n_tile / 128 per 64-k stage times the
    configuration's measured relative cost; blocks sharing an SM share its tensor cores,
    so a wave of b blocks per SM takes b times one block."""
    model = _config()["cost_model"]
    per_sm = int(model["blocks_per_sm"][choice.key])
    n_pad, k_pad = padded_sizes(n, k)
    blocks = math.ceil(n_pad / choice.n_tile) * math.ceil(m / choice.m_tile) * choice.k_splits
    per_stage = ((float(model["stage_overhead_tokens"]) + choice.m_tile)
                 * choice.n_tile / TILE_N * float(model["relative_cost"][choice.key]))
    if choice.stream_k:  # no waves: every SM takes an equal share of all the stages
        stages = blocks * (k_pad // STAGE_K) / stream_k_grid(m, n, k, choice, sms)
        return math.ceil(stages) * per_stage * (1.0 + float(model["stream_k_penalty"]))
    waves = math.ceil(blocks / (sms * per_sm))
    stages = math.ceil(k_pad / STAGE_K / choice.k_splits)
    split_penalty = 1.0 + float(model["split_penalty"]) * (choice.k_splits - 1)
    return waves * per_sm * stages * per_stage * split_penalty


def measured_choice(m: int, n: int, k: int, bits: int) -> Optional[Tuple[float, TileChoice]]:
    """(|log2 M - log2 M'|, configuration) of the measured M' nearest to M for this
    (K, N, bits) (configs/cuda_prefill.json, "measured": each entry's source names the sweep
    and the GPU), or None."""
    best = None
    for entry in _config().get("measured", []):
        if (entry["k"], entry["n"], entry["bits"]) != (k, n, bits):
            continue
        distance = abs(math.log2(m) - math.log2(entry["m"]))
        if best is None or distance < best[0]:
            best = (distance, TileChoice(int(entry["m_tile"]), int(entry["k_splits"]),
                                         int(entry["n_tile"]),
                                         bool(entry.get("warp_specialized", False)),
                                         bool(entry.get("stream_k", False))))
    return best


@functools.lru_cache(maxsize=4096)
def choose_tile(m: int, n: int, k: int, sms: int, bits: int = 4) -> TileChoice:
    """The measured configuration of this layer shape if there is one for M within a
    factor of 2 of a measured M, else the cheapest by :func:`estimate_cost`."""
    k_stages = padded_sizes(n, k)[1] // STAGE_K
    measured = measured_choice(m, n, k, bits)
    if measured is not None and measured[0] <= 1.0 and measured[1].k_splits <= k_stages:
        return measured[1]
    model = _config()["cost_model"]
    max_splits = min(int(model["max_k_splits"]), k_stages)
    # stream-K enters the model once its overhead has been measured ("stream_k_penalty")
    choices = all_choices(max_splits, stream_k="stream_k_penalty" in model)
    return min(choices, key=lambda c: estimate_cost(m, n, k, c, sms))


def prefill_matmul(x: torch.Tensor, prepared: DecodePrepared, bias: Optional[torch.Tensor],
                   m_tile: Optional[int] = None, k_splits: Optional[int] = None,
                   n_tile: int = 128, warp_specialized: bool = False, stream_k: bool = False,
                   stream_k_blocks: Optional[int] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the Hopper prefill kernel. x: [M, K] fp16/bf16 on the
    weight's device; ``m_tile`` / ``k_splits`` (both or neither), ``n_tile``,
    ``warp_specialized`` and ``stream_k`` (warp-specialized with k_splits = 1 only) override
    :func:`choose_tile`; ``stream_k_blocks`` sets a stream-K launch's block count (default:
    one per SM; tests use few blocks so that each spans several tiles); ``out`` is an
    optional contiguous [M, N] result buffer of x's dtype (tests poison it)."""
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"dqgemm CUDA extension {_ext.extension_error()}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    if k != prepared.k:
        raise ValueError(f"x: expected {prepared.k} columns, got {k}")
    if m < 1:
        raise ValueError(f"x: expected at least 1 row, got {m}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected float16 or bfloat16, got {x.dtype}")
    x, scales, zo, bias = cuda_decode.call_operands(x, prepared, bias)
    n = prepared.n
    n_pad, k_pad = padded_sizes(n, k)
    device = x.device
    if (m_tile is None) != (k_splits is None):
        raise ValueError(f"m_tile, k_splits: expected both or neither, got m_tile={m_tile!r}, "
                         f"k_splits={k_splits!r}")
    if m_tile is None:
        choice = choose_tile(m, n, k, cuda_decode._sm_count(device.index), prepared.bits)
    else:
        if m_tile not in M_TILES:
            raise ValueError(f"m_tile: expected one of {M_TILES}, got {m_tile!r}")
        if not isinstance(k_splits, int) or not 1 <= k_splits <= k_pad // STAGE_K:
            raise ValueError(f"k_splits: expected an int in 1..{k_pad // STAGE_K}, got "
                             f"{k_splits!r}")
        choice = TileChoice(m_tile, k_splits, n_tile, bool(warp_specialized), bool(stream_k))
        if stream_k and not (warp_specialized and k_splits == 1):
            raise ValueError(f"stream_k: needs warp_specialized=True and k_splits=1, got "
                             f"warp_specialized={warp_specialized!r}, k_splits={k_splits!r}")
        if stream_k and (m_tile, n_tile) == (128, 256):
            raise ValueError("stream_k: not available with m_tile=128, n_tile=256 (no registers "
                             "left for it in that kernel), got m_tile=128, n_tile=256")
        if not choice.valid():  # m_tile and k_splits are checked: the width is wrong
            raise ValueError(f"n_tile: expected one of {N_TILES} (256 only with m_tile <= "
                             f"128), got {n_tile!r} with m_tile={m_tile}")
    tiles = math.ceil(n_pad / choice.n_tile) * math.ceil(m / choice.m_tile)
    stream = _ext.stream_handle(device)
    ws_ptr = counters_ptr = 0
    units = tiles * (k_pad // STAGE_K)
    if stream_k_blocks is not None and (not choice.stream_k or isinstance(stream_k_blocks, bool)
                                        or not isinstance(stream_k_blocks, int)
                                        or not 1 <= stream_k_blocks <= units):
        raise ValueError(f"stream_k_blocks: expected an int in 1..{units} (the layer's tile x "
                         f"k stage units) with stream-K, got {stream_k_blocks!r} "
                         f"(stream_k={choice.stream_k})")
    if choice.stream_k:  # two partial-sum slots per block (its first and last tile)
        if stream_k_blocks is None:
            stream_k_blocks = stream_k_grid(m, n, k, choice, cuda_decode._sm_count(device.index))
        ws, counters = cuda_decode.workspace(
            device, stream, 2 * stream_k_blocks * choice.m_tile * choice.n_tile, tiles)
        ws_ptr, counters_ptr = ws.data_ptr(), counters.data_ptr()
    elif choice.k_splits > 1:
        ws, counters = cuda_decode.workspace(
            device, stream, tiles * choice.k_splits * choice.m_tile * choice.n_tile, tiles)
        ws_ptr, counters_ptr = ws.data_ptr(), counters.data_ptr()
    y = cuda_decode.output_buffer(out, m, n, x.dtype, device)
    ext.prefill_gemm(
        x=x.data_ptr(), weight=prepared.packed.data_ptr(), scales=scales.data_ptr(),
        zo=0 if zo is None else zo.data_ptr(), bias=0 if bias is None else bias.data_ptr(),
        y=y.data_ptr(), workspace=ws_ptr, counters=counters_ptr,
        m=m, n=n, k=k, n_pad=n_pad, k_pad=k_pad,
        groups_padded=cuda_decode.groups_padded(k, prepared.group_size),
        group_size_log2=cuda_decode.group_size_log2(k, prepared.group_size),
        bits=prepared.bits, dtype=_ext.dtype_code(x.dtype, "x"),
        zero_mode=_ext.ZERO_MODE_CODES[prepared.zero_mode], m_tile=choice.m_tile,
        n_tile=choice.n_tile, k_splits=choice.k_splits,
        warp_specialized=choice.warp_specialized,
        stream_k_blocks=stream_k_blocks if choice.stream_k else 0,
        stream=stream)
    return y


class CudaPrefillKernel(registry.Kernel):
    name = "cuda_prefill"
    backend = "cuda"
    priority = 14          # below cuda_decode: without a dispatch rule, decode serves M <= 64
    prepared_key = "cuda_decode"

    def available(self):
        reason = _ext.cuda_unavailable_reason()
        if reason is not None:
            return reason
        ext = _ext.extension()
        if not hasattr(ext, "prefill_gemm"):
            return "CUDA extension built without prefill_gemm (rebuild: pip install -e .)"
        if "90a" not in str(getattr(ext, "COMPILED_ARCHS", "")).split(";"):
            return (f"CUDA extension built without sm_90a (DQGEMM_CUDA_ARCHS="
                    f"{ext.COMPILED_ARCHS!r}); the wgmma kernels need it")
        return None

    def supports(self, problem):
        if problem.device_type != "cuda":
            return f"needs a CUDA device, got {problem.device_type}"
        if tuple(problem.arch) != (9, 0):
            return f"needs compute capability 9.0 (Hopper, sm_90a wgmma), got {problem.arch}"
        if problem.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16 activations, got {problem.dtype}"
        if problem.k % 8:
            return f"needs K % 8 == 0 (16-byte activation rows), got K = {problem.k}"
        if problem.bits not in (4, 8):
            return f"needs 4- or 8-bit codes, got {problem.bits}"
        return None

    def prepare(self, qweight):
        return cuda_decode.prepare_decode(qweight)

    def run(self, x, prepared, bias, spec):
        return prefill_matmul(x, prepared, bias)


registry.register(CudaPrefillKernel())
