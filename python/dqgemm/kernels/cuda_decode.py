"""Kernel "cuda_decode": hand-written CUDA W4A16 / W8A16 GEMM for decode (M = 1..64).

What it computes: y[M, N] = x[M, K] @ dequant(W)^T (+ bias) in one launch of
csrc/decode_gemm.cu (tensor cores, weight streamed once through a cp.async pipeline,
deterministic stream-K over all SMs). Activations fp16 or bf16; 4-bit or 8-bit codes;
group size 32/64/128/256 or per-channel; symmetric, integer zero points, or offsets
(fractional zero points are turned into offsets o = -z * s at load time).

Prepared layout (built once by :meth:`CudaDecodeKernel.prepare`, pure PyTorch; byte-level
description in the header of csrc/decode_gemm.cuh):

``packed``   uint8, flat: the codes re-laid out by :func:`pack_decode_weight` so that each
             GPU thread reads 16 bytes holding its tensor-core fragments. N and K are
             padded to multiples of 128 with code 0 (and scale 0).
``scales``   the group parameters by :func:`pack_group_params`, in the activation dtype
             (fp16 or bf16; one copy per dtype, made on first use of that dtype).
``zero_points`` / ``offsets``: likewise, or None.
``act_index`` int64 [K] for act-order weights: the weight columns are sorted by group
             (dqgemm.act_order.sort_by_group) and each call gathers x[:, act_index] once.

Constraints: CUDA device of compute capability >= 8.0, fp16/bf16 activations, 1 <= M <= 64,
K % 8 == 0. Workspaces (fp32 partial sums, int32 tile counters) are cached per device and
stream and only grow; counters are left at zero by every launch, so calls are CUDA-graph
capturable after one warm-up call. No host synchronization.

Test: pytest tests/test_cuda_decode.py. Benchmark: python bench/cuda_decode_bench.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, Optional, Set, Tuple

import torch

from .. import _ext, launch, registry
from ..act_order import contiguous_groups
from ..format import QuantizedWeight, effective_group_size

TILE_N = 128            # channels per n_tile (kernel layout constant)
TILE_K = 128            # K is padded to a multiple of this
M_MAX = 64
_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "cuda_decode.json")


# ----------------------------------------------------------------------------------------
# Pure-PyTorch re-layout (and its inverse, used by the tests).
# ----------------------------------------------------------------------------------------

def _ceil_to(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def padded_sizes(n: int, k: int) -> Tuple[int, int]:
    """(N_pad, K_pad): both rounded up to multiples of 128."""
    return _ceil_to(n, TILE_N), _ceil_to(k, TILE_K)


# Dimension names of a code matrix viewed for the re-layout. A 16x16 tensor-core tile is
# (n16 slice a, row-half h, row r) x (k16 step jj, k-half kh, lane-quad q, pair element e):
# row = a*16 + h*8 + r, k = jj*16 + kh*8 + q*2 + e. Lane = r*4 + q owns rows r and r+8 and
# k = 2q, 2q+1, 2q+8, 2q+9 of the tile (the mma.m16n8k16 A-fragment).
#   4-bit: per lane 4 words (jj), nibble p = e*4 + kh*2 + h      -> order (jj, e, kh, h)
#   8-bit: per lane 4 words (jj, kh), byte b = e*2 + h           -> order (jj, kh, e, h)
_SRC_DIMS = ("t", "a", "h", "r", "kb", "jj", "kh", "q", "e")
_DST_DIMS = {4: ("t", "kb", "a", "r", "q", "jj", "e", "kh", "h"),
             8: ("t", "kb", "a", "r", "q", "jj", "kh", "e", "h")}


def _perm(bits: int):
    return [_SRC_DIMS.index(d) for d in _DST_DIMS[bits]]


def pack_decode_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [N, K] (values < 2**bits) -> the kernel's flat uint8 layout.

    Layout: [N_pad/128][K_pad/span][8 slices of 16 rows][32 lanes][16 bytes], span = 64
    (4-bit) or 32 (8-bit); see the module docstring of csrc/decode_gemm.cuh.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"codes: expected a uint8 [N, K] tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    n, k = codes.shape
    n_pad, k_pad = padded_sizes(n, k)
    full = torch.zeros(n_pad, k_pad, dtype=torch.uint8, device=codes.device)
    full[:n, :k] = codes
    jj = 4 if bits == 4 else 2
    view = full.view(n_pad // 128, 8, 2, 8, k_pad // (16 * jj), jj, 2, 4, 2)
    lanes = view.permute(*_perm(bits)).contiguous()
    if bits == 8:
        return lanes.reshape(-1)
    nib = lanes.reshape(-1, 8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).reshape(-1)


def unpack_decode_weight(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_decode_weight`: flat layout -> codes uint8 [N, K]."""
    n_pad, k_pad = padded_sizes(n, k)
    if packed.numel() != n_pad * k_pad * bits // 8:
        raise ValueError(f"packed: expected {n_pad * k_pad * bits // 8} bytes for N={n}, "
                         f"K={k}, bits={bits}, got {packed.numel()}")
    jj = 4 if bits == 4 else 2
    if bits == 4:
        b = packed.reshape(-1, 4)
        nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)
    else:
        nib = packed.reshape(-1)
    dst_shape = {"t": n_pad // 128, "a": 8, "h": 2, "r": 8, "kb": k_pad // (16 * jj),
                 "jj": jj, "kh": 2, "q": 4, "e": 2}
    lanes = nib.reshape([dst_shape[d] for d in _DST_DIMS[bits]])
    inverse = [_DST_DIMS[bits].index(d) for d in _SRC_DIMS]
    full = lanes.permute(*inverse).reshape(n_pad, k_pad)
    return full[:n, :k].contiguous()


def groups_padded(k: int, group_size: int) -> int:
    """Groups per 128-channel tile in the parameter layout (1 for per-channel)."""
    if group_size == -1:
        return 1
    return padded_sizes(1, k)[1] // group_size


def pack_group_params(values: torch.Tensor, group_size: int, k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Per-group values [N, G] -> flat [N_pad/128][G_pad][8 slices][8 rows r][2: r, r+8]."""
    n, g = values.shape
    n_pad = padded_sizes(n, k)[0]
    g_pad = groups_padded(k, group_size)
    full = torch.zeros(n_pad, g_pad, dtype=dtype, device=values.device)
    full[:n, :g] = values.to(dtype)
    return full.view(n_pad // 128, 8, 2, 8, g_pad).permute(0, 4, 1, 3, 2).reshape(-1).contiguous()


def unpack_group_params(packed: torch.Tensor, n: int, g: int, group_size: int,
                        k: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_params` -> [N, G]."""
    n_pad = padded_sizes(n, k)[0]
    g_pad = groups_padded(k, group_size)
    full = packed.view(n_pad // 128, g_pad, 8, 8, 2).permute(0, 2, 4, 3, 1).reshape(n_pad, g_pad)
    return full[:n, :g]


def group_size_log2(k: int, group_size: int) -> int:
    """The kernel's group-size code: log2(group_size), or 30 (one group) per-channel."""
    if group_size == -1:
        return 30
    return group_size.bit_length() - 1


# ----------------------------------------------------------------------------------------
# Prepared weight.
# ----------------------------------------------------------------------------------------

ZERO_MODES = ("symmetric", "zero_points", "offsets")


@dataclasses.dataclass
class DecodePrepared(registry.PreparedWeight):
    """PreparedWeight of cuda_decode. ``scales`` / ``zero_points`` / ``offsets`` hold the
    packed group parameters of ``params_dtype``; other dtypes are packed on first use from
    the fp32 ``source_*`` copies and kept in ``variants``."""

    bits: int = 4
    group_size: int = 128
    n: int = 0
    k: int = 0
    zero_mode: str = "symmetric"
    params_dtype: torch.dtype = torch.float16
    source_scales: Optional[torch.Tensor] = None   # fp32 [N, G]
    source_zo: Optional[torch.Tensor] = None       # fp32 [N, G] zero points or offsets
    variants: Dict[torch.dtype, Tuple[torch.Tensor, Optional[torch.Tensor]]] = \
        dataclasses.field(default_factory=dict)
    # activation dtypes this weight has been launched with: the first launch of each may
    # follow the writes of its packed parameters, so it is never a programmatic launch
    # (dqgemm.launch: the weights are read before the wait for the previous kernel)
    launched: Set[torch.dtype] = dataclasses.field(default_factory=set)

    def params_for(self, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hit = self.variants.get(dtype)
        if hit is None:
            hit = _pack_params(self.source_scales, self.source_zo, self.group_size, self.k,
                               dtype)
            self.variants[dtype] = hit
        return hit


def _pack_params(scales, zo, group_size, k, dtype):
    s = pack_group_params(scales, group_size, k, dtype)
    if not torch.isfinite(s).all():
        raise ValueError(f"scales: expected values representable in {dtype}, got "
                         f"{scales.abs().max().item():.3e} at most (overflow)")
    z = None if zo is None else pack_group_params(zo, group_size, k, dtype)
    return s, z


def _zero_mode_and_terms(qw: QuantizedWeight):
    """(mode, fp32 zero-or-offset tensor or None). Integer zero points in [0, 2^bits) stay
    zero points (exact in fp16/bf16); any other zero point becomes an offset -z * s."""
    if qw.zero_points is not None:
        z = qw.zero_points.float()
        integral = bool(torch.equal(z, z.round())) and (z.numel() == 0 or (
            float(z.min()) >= 0 and float(z.max()) < (1 << qw.bits)))
        if integral:
            return "zero_points", z
        return "offsets", -z * qw.scales.float()
    if qw.offsets is not None:
        return "offsets", qw.offsets.float()
    return "symmetric", None


# ----------------------------------------------------------------------------------------
# Launch configuration (data) and cached workspaces.
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _config() -> Dict:
    with open(_CONFIG_FILE) as f:
        return json.load(f)


def launch_table() -> Dict[str, Dict[str, int]]:
    """configs/cuda_decode.json: blocks per SM for each token tile, by weight bits."""
    return _config()["blocks_per_sm"]


def table_blocks_per_sm(m: int, bits: int, units: Optional[int] = None,
                        programmatic: bool = False) -> int:
    """The launch table's blocks per SM for M's token tile (at M <= 16 it also sets the
    shared-memory ring depth in the launcher); for a layer of ``units`` units of work, the
    table's small-layer rule first (configs/cuda_decode.json, "small_layers"), unless the
    calls are programmatic launches and the rule does not apply to them."""
    if units is not None:
        rule = _config().get("small_layers", {}).get(f"int{bits}", {}).get(str(m_tile(m)))
        if (rule is not None and units <= int(rule["max_units"])
                and not (programmatic and not rule.get("applies_to_programmatic_launch",
                                                       True))):
            return int(rule["blocks_per_sm"])
    return int(launch_table()[f"int{bits}"][str(m_tile(m))])


@functools.lru_cache(maxsize=16)
def _capability(device_index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device_index))


def table_producer_warp(m: int, bits: int, blocks_per_sm: int, units: int,
                        device_index: int) -> bool:
    """configs/cuda_decode.json, "producer_warp": whether a layer of ``units`` units of
    work, at M's token tile and this many blocks per SM, runs the configuration with a
    copying warp (bulk copies; compute capability 9.0 and later only)."""
    rule = _config().get("producer_warp", {})
    if _capability(device_index) < tuple(rule.get("min_capability", (9, 0))):
        return False
    if units < int(rule.get("min_units", 0)):
        return False
    return blocks_per_sm in rule.get(f"int{bits}", {}).get(str(m_tile(m)), [])


def table_programmatic_launch(m: int, bits: int) -> bool:
    """configs/cuda_decode.json, "programmatic_launch": whether a call at M's token tile is
    a programmatic dependent launch within dqgemm.programmatic_launch()."""
    rule = _config().get("programmatic_launch", {})
    return bool(rule.get(f"int{bits}", {}).get(str(m_tile(m)), False))


@functools.lru_cache(maxsize=4096)
def work_units(m: int, n: int, k: int, bits: int) -> int:
    """Units of work of the stream-K partition: 128-channel tiles x k stages per tile."""
    n_pad, k_pad = padded_sizes(n, k)
    bk = stage_k(m, bits)
    return (n_pad // TILE_N) * ((k_pad + bk - 1) // bk)


def max_splits_table() -> Dict[str, int]:
    """configs/cuda_decode.json: most blocks sharing one 128-channel tile, by token tile."""
    return _config()["max_splits_per_tile"]


def m_tile(m: int) -> int:
    return 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64


def stage_k(m: int, bits: int) -> int:
    """k per pipeline stage (must match decode_gemm_stage_k in csrc/decode_gemm.cu): 16 KB of
    weights per stage at M <= 16 (256 at 4-bit, 128 at 8-bit), 128 at M <= 32, 64 above."""
    tile = m_tile(m)
    if tile == 64:
        return 64
    return 256 if tile <= 16 and bits == 4 else 128


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def grid_size(m: int, n: int, k: int, bits: int, device_index: int,
              blocks_per_sm: Optional[int] = None) -> int:
    """Stream-K grid: SMs x blocks per SM, at most one block per unit of work and at most
    max_splits_per_tile blocks per 128-channel tile (on average)."""
    tiles = padded_sizes(n, k)[0] // TILE_N
    units = work_units(m, n, k, bits)
    if blocks_per_sm is None:
        blocks_per_sm = table_blocks_per_sm(m, bits, units)
    splits = int(max_splits_table()[str(m_tile(m))])
    return max(1, min(units, _sm_count(device_index) * blocks_per_sm, tiles * splits))


# (device index, stream handle) -> [fp32 workspace, int32 counters]
_WORKSPACES: Dict[Tuple[int, int], list] = {}


def workspace(device: torch.device, stream: int, floats: int, tiles: int):
    key = (device.index, stream)
    entry = _WORKSPACES.get(key)
    if entry is None:
        entry = [torch.empty(0, dtype=torch.float32, device=device),
                 torch.zeros(0, dtype=torch.int32, device=device)]
        _WORKSPACES[key] = entry
    if entry[0].numel() < floats:
        entry[0] = torch.empty(max(floats, 2 * entry[0].numel()), dtype=torch.float32,
                               device=device)
    if entry[1].numel() < tiles:
        # counters must start at 0; every launch leaves them at 0
        entry[1] = torch.zeros(max(tiles, 2 * entry[1].numel()), dtype=torch.int32,
                               device=device)
    return entry[0], entry[1]


def call_operands(x: torch.Tensor, prepared: DecodePrepared, bias: Optional[torch.Tensor]):
    """What the CUDA kernels on this layout (cuda_decode, cuda_prefill) take for one call:
    x gathered by act-order and contiguous at a 16-byte boundary, the group parameters of
    x's dtype, and the bias in x's dtype. Returns (x, scales, zero_or_offset, bias)."""
    if prepared.act_index is not None:
        x = x.index_select(1, prepared.act_index)   # the one activation gather per call
    if not x.is_contiguous() or x.data_ptr() % 16:
        # a view into a larger buffer may start off a 16-byte boundary: a fresh copy
        # does not (torch's allocator aligns to >= 256 bytes)
        x = x.clone(memory_format=torch.contiguous_format)
    scales, zo = prepared.params_for(x.dtype)
    if bias is not None:
        if bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        bias = bias.contiguous()
    return x, scales, zo, bias


def output_buffer(out: Optional[torch.Tensor], m: int, n: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A fresh [m, n] result, or ``out`` after checking it is a contiguous one."""
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if (tuple(out.shape) != (m, n) or out.dtype != dtype or out.device != device
            or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {dtype} [{m}, {n}] tensor on "
                         f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


PRODUCER_M_MAX = 16     # token tiles with a copying-warp configuration (8 and 16)


def _require_sm90(argument: str, device: torch.device) -> None:
    """The launch options that use bulk copies or griddepcontrol need sm_90+."""
    if _capability(device.index) < (9, 0):
        raise ValueError(f"{argument}: needs compute capability 9.0 or later, "
                         f"{device} has {_capability(device.index)}")


def decode_matmul(x: torch.Tensor, prepared: DecodePrepared, bias: Optional[torch.Tensor],
                  blocks_per_sm: Optional[int] = None,
                  out: Optional[torch.Tensor] = None,
                  producer_warp: Optional[bool] = None,
                  programmatic_launch: Optional[bool] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the decode kernel. x: contiguous [M, K] fp16/bf16 on the
    weight's device, 1 <= M <= 64. ``blocks_per_sm`` and ``producer_warp`` (the
    configuration with a copying warp: M <= 16, compute capability 9.0+) override the
    launch table (tuning, tests), as does ``programmatic_launch`` (compute capability
    9.0+: a programmatic dependent launch, the first stages' weights fetched while the
    previous kernel in the stream finishes; default: within dqgemm.programmatic_launch()
    per the table's "programmatic_launch" entry, or per its "producer_warp" entry with the
    copying warp, and never at a weight's first launch with x's dtype); ``out`` is an
    optional contiguous [M, N] result buffer of x's dtype (tests poison it)."""
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"dqgemm CUDA extension {_ext.extension_error()}")
    m, k = x.shape
    if k != prepared.k:
        raise ValueError(f"x: expected {prepared.k} columns, got {k}")
    if not 1 <= m <= M_MAX:
        raise ValueError(f"x: expected 1..{M_MAX} rows for cuda_decode, got {m}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected float16 or bfloat16, got {x.dtype}")
    x, scales, zo, bias = call_operands(x, prepared, bias)
    n = prepared.n
    n_pad, k_pad = padded_sizes(n, k)
    device = x.device
    units = work_units(m, n, k, prepared.bits)
    # Within dqgemm.programmatic_launch(), per the table (also for a weight's first launch,
    # which is a normal one, so that every call under the policy has the same grid)
    by_policy = (launch.programmatic_launch_enabled()
                 and table_programmatic_launch(m, prepared.bits)
                 and _capability(device.index) >= (9, 0))
    if blocks_per_sm is None:
        blocks_per_sm = table_blocks_per_sm(m, prepared.bits, units, by_policy)
    elif not isinstance(blocks_per_sm, int) or blocks_per_sm < 1:
        raise ValueError(f"blocks_per_sm: expected an int >= 1, got {blocks_per_sm!r}")
    for name, value in (("producer_warp", producer_warp),
                        ("programmatic_launch", programmatic_launch)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool or None, got {value!r}")
    if producer_warp is None:
        producer_warp = table_producer_warp(m, prepared.bits, blocks_per_sm, units,
                                            device.index)
    elif producer_warp:
        if m > PRODUCER_M_MAX:
            raise ValueError(f"producer_warp: the copying-warp configuration serves "
                             f"M <= {PRODUCER_M_MAX}, got M = {m}")
        _require_sm90("producer_warp", device)
    if programmatic_launch is None:
        by_producer_rule = producer_warp and bool(
            _config().get("producer_warp", {}).get("programmatic_launch", False))
        programmatic_launch = ((by_policy or by_producer_rule) and x.dtype in prepared.launched
                               and _capability(device.index) >= (9, 0))
    elif programmatic_launch:
        _require_sm90("programmatic_launch", device)
    grid = grid_size(m, n, k, prepared.bits, device.index, blocks_per_sm)
    stream = _ext.stream_handle(device)
    ws, counters = workspace(device, stream, 2 * grid * m * TILE_N, n_pad // TILE_N)
    y = output_buffer(out, m, n, x.dtype, device)
    ext.decode_gemm(
        x=x.data_ptr(), weight=prepared.packed.data_ptr(), scales=scales.data_ptr(),
        zo=0 if zo is None else zo.data_ptr(), bias=0 if bias is None else bias.data_ptr(),
        y=y.data_ptr(), workspace=ws.data_ptr(), counters=counters.data_ptr(),
        m=m, n=n, k=k, n_pad=n_pad, k_pad=k_pad,
        groups_padded=groups_padded(k, prepared.group_size),
        group_size_log2=group_size_log2(k, prepared.group_size), bits=prepared.bits,
        dtype=_ext.dtype_code(x.dtype, "x"), zero_mode=_ext.ZERO_MODE_CODES[prepared.zero_mode],
        blocks_per_sm=blocks_per_sm, producer_warp=producer_warp,
        programmatic_launch=programmatic_launch, grid=grid, stream=stream)
    prepared.launched.add(x.dtype)
    return y


# ----------------------------------------------------------------------------------------
# The registered kernel.
# ----------------------------------------------------------------------------------------

def prepare_decode(qweight: QuantizedWeight) -> DecodePrepared:
    qw, perm = contiguous_groups(qweight)
    mode, zo = _zero_mode_and_terms(qw)
    scales = qw.scales.float().contiguous()
    dtype = qw.scales.dtype if qw.scales.dtype in (torch.float16, torch.bfloat16) \
        else torch.float16
    s_packed, z_packed = _pack_params(scales, zo, qw.group_size, qw.in_features, dtype)
    return DecodePrepared(
        packed=pack_decode_weight(qw.codes().contiguous(), qw.bits), scales=s_packed,
        zero_points=z_packed if mode == "zero_points" else None,
        offsets=z_packed if mode == "offsets" else None,
        act_index=None if perm is None else perm.to(torch.int64).contiguous(),
        bits=qw.bits, group_size=qw.group_size, n=qw.out_features, k=qw.in_features,
        zero_mode=mode, params_dtype=dtype, source_scales=scales,
        source_zo=None if zo is None else zo.contiguous(),
        variants={dtype: (s_packed, z_packed)})


class CudaDecodeKernel(registry.Kernel):
    name = "cuda_decode"
    backend = "cuda"
    priority = 15

    def available(self):
        reason = _ext.cuda_unavailable_reason()
        if reason is None and not hasattr(_ext.extension(), "decode_gemm"):
            return "CUDA extension built without decode_gemm (rebuild: pip install -e .)"
        return reason

    def supports(self, problem):
        if problem.device_type != "cuda":
            return f"needs a CUDA device, got {problem.device_type}"
        if tuple(problem.arch) < (8, 0):
            return f"needs compute capability >= 8.0 (mma.sync bf16), got {problem.arch}"
        if problem.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16 activations, got {problem.dtype}"
        if not 1 <= problem.m <= M_MAX:
            return f"serves M = 1..{M_MAX} (decode), got M = {problem.m}"
        if problem.k % 8:
            return f"needs K % 8 == 0 (16-byte activation rows), got K = {problem.k}"
        if problem.bits not in (4, 8):
            return f"needs 4- or 8-bit codes, got {problem.bits}"
        return None

    def prepare(self, qweight):
        return prepare_decode(qweight)

    def run(self, x, prepared, bias, spec):
        return decode_matmul(x, prepared, bias)


registry.register(CudaDecodeKernel())
