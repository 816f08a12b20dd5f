"""Kernel "triton": the Triton backend's layout, config choice and launch (shared part).

What it computes: y = x @ dequant(W)^T (+ bias) for kpack-v1 weights, INT4 or INT8, any
group size (32/64/128/256/per-channel), symmetric / zero_points / offsets, act-order,
fp16 or bf16 activations on CUDA (fp16 on the CPU through TRITON_INTERPRET=1, for CI).
One registered kernel, four kernel families, picked per call by :func:`choose_config`:

  family  file                when (heuristic; the shipped table refines it)
  gemv    triton_gemv.py      M == 1: no tensor cores, split-K over all SMs
  splitk  triton_splitk.py    small M: tensor cores on M padded to 16, split-K
  gemm    triton_gemm.py      large M: tiled GEMM, one program per output tile
  dequant triton_dequant.py   large M: Triton dequantizes W^T into a buffer, then cuBLAS

Prepared layout (built once per weight by prepare(), cached by ops.py):
  packed  int32 [KW, N], KW = ceil(K / E), E = 32 // bits codes per word. Word (r, n) holds
          q[n, E*r + j] in bits [bits*j, bits*(j+1)), j = 0..E-1, lowest first (the GPTQ
          qweight order). Codes past K are 0; the kernels mask x there, so they add 0.
          Rows along K, columns along N: a program's loads are contiguous along N.
  scales  [G, N], the weight's scale dtype (fp16/bf16/fp32), transposed.
  zero_points / offsets: fp32 [G, N] transposed (fp32 so fractional HQQ-style zero points
          keep their precision; they are 1/group_size of the traffic).
  act_index int32 [K]: for act-order weights the permutation of sort_by_group; the weight
          rows are stored sorted; run_with_config gathers x[:, perm] once per call (the
          fused kernels' inner loops then read x contiguously; their perm_ptr path stays
          for direct callers); the dequant family gathers x once into a cached buffer.

Dequantization without int->float conversion instructions (I2F runs at 1/8 the FMA rate):
OR the code into the mantissa of 2**23 (0x4B000000) and subtract 2**23 in fp32.

Capturable in CUDA graphs: run() does no host sync and allocates only the output; split-K
workspaces (fp32 [splits, M, N], reduced by a second deterministic kernel, no atomics) and
the dequant family's W^T buffer are cached per (device, size) and never freed, so a
captured graph never sees them move (warm up once per shape before capturing).
Two streams running split-K layers of the same size concurrently would share a
workspace: run them on one stream (the usual case) or give each its own process.

Config choice: python/dqgemm/configs/triton_h100.json (one entry per GPU, measured there:
the H100 and the H200; readable keys) first, then the heuristic in :func:`heuristic_config`.
No autotuning at run time.

Test: tests/test_triton.py (CPU: interpreter, fp16, shapes <= 256; GPU: the full sweep).
Benchmark/tuning: bench/triton_tune.py (raw timings in bench/results/triton_tune_h*_*.json;
what limits each family: bench/results/NOTES.md, section Triton).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import registry
from ..format import effective_group_size, num_groups, unpack_codes

try:  # triton is optional: the package must import without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

# The interpreter must be on before the @triton.jit kernels are defined (import time of the
# family modules); remember whether it was, so supports() can refuse CPU tensors otherwise.
INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"

MAGIC_F32 = 0x4B000000          # bits of 2.0**23
ZERO_MODES = {"symmetric": 0, "zero_points": 1, "offsets": 2}
FAMILIES = ("gemv", "splitk", "gemm", "dequant")
_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "triton_h100.json")


# ----------------------------------------------------------------------------------------
# Prepared layout.
# ----------------------------------------------------------------------------------------

def codes_per_word(bits: int) -> int:
    return 32 // bits


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [N, K] -> int32 [ceil(K/E), N] (see the module docstring)."""
    n, k = codes.shape
    e = codes_per_word(bits)
    kw = -(-k // e)
    padded = torch.zeros(n, kw * e, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(e, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(n, kw, e) << shifts).sum(dim=-1)          # < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)   # as signed int32
    return words.to(torch.int32).t().contiguous()


def unpack_words(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_words (for tests): int32 [KW, N] -> codes uint8 [N, K]."""
    e = codes_per_word(bits)
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(e, device=words.device, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[1], -1)[:, :in_features].to(torch.uint8)


def prepare_weight(qweight) -> registry.PreparedWeight:
    """The Triton layout of a canonical QuantizedWeight (sorted first if act-order)."""
    from ..act_order import contiguous_groups
    qweight, perm64 = contiguous_groups(qweight)
    perm = None if perm64 is None else perm64.to(torch.int32).contiguous()
    codes = unpack_codes(qweight.qdata, qweight.bits, qweight.in_features)
    packed = pack_words(codes, qweight.bits)

    def transposed_fp32(t):
        return None if t is None else t.float().t().contiguous()

    return registry.PreparedWeight(
        packed=packed, scales=qweight.scales.t().contiguous(),
        zero_points=transposed_fp32(qweight.zero_points),
        offsets=transposed_fp32(qweight.offsets), act_index=perm)


# ----------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile shape and launch parameters of one kernel family.

    block_k counts codes along K (a multiple of 32 // bits * 16 for splitk, so each of the
    per-plane dots has K >= 16). split_k = 0 means "choose from the SM count".
    """

    family: str
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    planes: bool = False   # splitk only: E per-plane dots instead of one reshaped dot
    ctas_per_sm: int = 2   # gemv/splitk with split_k = 0: split K until ~this many programs
                           # per SM exist (more = finer load balance, larger reduction)
    shiftless: bool = False  # gemv only: read codes in place, scale x instead (see gemv)
    row_reduce: bool = False  # gemv only: [BLOCK_N] accumulator, rows folded every step
    prefetch: bool = True     # gemv only: register double buffer of the next step's words
    w_lhs: bool = False       # gemm only: out^T = W x^T, the weight as the dot's LHS
                              # (register-A wgmma on Hopper; see triton_gemm.py)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One row of the shipped table: conditions (unset = any) and the config they pick."""

    config: TritonConfig
    bits: Optional[int] = None
    group_size: Optional[int] = None
    dtype: Optional[str] = None
    m_min: Optional[int] = None
    m_max: Optional[int] = None
    n: Optional[int] = None
    k: Optional[int] = None
    note: str = ""

    def matches(self, bits, group_size, dtype, m, n, k) -> bool:
        return ((self.bits is None or self.bits == bits)
                and (self.group_size is None or self.group_size == group_size)
                and (self.dtype is None or self.dtype == dtype)
                and (self.m_min is None or m >= self.m_min)
                and (self.m_max is None or m <= self.m_max)
                and (self.n is None or self.n == n)
                and (self.k is None or self.k == k))


@functools.lru_cache(maxsize=None)
def config_table(path: str = _CONFIG_FILE) -> Tuple[Tuple[str, Tuple[TableEntry, ...]], ...]:
    """((device-name substring, entries), ...) from the JSON table; empty if absent."""
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    out = []
    for gpu in data.get("gpus", []):
        entries = []
        for e in gpu["entries"]:
            e = dict(e)
            cfg = TritonConfig(**e.pop("config"))
            entries.append(TableEntry(config=cfg, **e))
        out.append((gpu["device_name"], tuple(entries)))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8   # interpreter: a small number keeps CPU runs short but still splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def heuristic_config(bits: int, group_size: int, m: int, n: int, k: int,
                     device: torch.device) -> TritonConfig:
    """The fallback for shapes/GPUs the table does not cover (rules of thumb, from the
    H100 tuning run of bench/results/triton_tune_h100_r1.json).

    - M == 1: GEMV, 64 columns x 512 INT4 codes per step (the best or near-best on all
      five tuned shapes), 4 warps, split-K to ~2 waves.
    - M <= 64: split-K tensor-core kernel, M padded to 16/32/64, 128 columns, one reshaped
      dot per step of 128 codes.
    - M > 64 (CUDA): Triton dequantization + cuBLAS; with the interpreter, the split-K
      kernel (no cuBLAS needed, and a single launch).
    """
    del group_size, n, k
    e = codes_per_word(bits)
    if m == 1:
        return TritonConfig("gemv", block_m=1, block_n=64, block_k=64 * e, num_warps=4,
                            num_stages=3)
    if m <= 64 or device.type != "cuda":
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        return TritonConfig("splitk", block_m=bm, block_n=128, block_k=128, num_warps=4,
                            num_stages=3)
    return TritonConfig("dequant", block_m=1, block_n=128, block_k=16 * e, num_warps=4,
                        num_stages=1)


@functools.lru_cache(maxsize=8192)
def choose_config(bits: int, group_size: int, dtype: torch.dtype, m: int, n: int, k: int,
                  device: torch.device) -> TritonConfig:
    """The one place that picks family and config: the shipped table, else the heuristic.

    Memoized (the table is fixed per process): an eager call pays a dict lookup, not a
    table scan and a device-name query.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dname = registry.dtype_name(dtype)
        for gpu, entries in config_table():
            if gpu in name:
                for entry in entries:
                    if entry.matches(bits, group_size, dname, m, n, k):
                        return entry.config
    return heuristic_config(bits, group_size, m, n, k, device)


def split_count(cfg: TritonConfig, tiles_mn: int, k_steps: int, device: torch.device
                ) -> Tuple[int, int]:
    """(splits, K steps per split): ~cfg.ctas_per_sm programs per SM, >= 2 steps per split."""
    if cfg.split_k > 0:
        want = cfg.split_k
    else:
        want = max(1, -(-cfg.ctas_per_sm * sm_count(device) // tiles_mn))
    want = max(1, min(want, k_steps // 2 if k_steps >= 4 else 1))
    per_split = -(-k_steps // want)
    return -(-k_steps // per_split), per_split


# ----------------------------------------------------------------------------------------
# Workspaces.
# ----------------------------------------------------------------------------------------

_WORKSPACES: Dict[Tuple[str, int, int], torch.Tensor] = {}


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    """An fp32 scratch buffer of ``numel`` elements, cached per (device, size), never freed
    (a captured CUDA graph keeps its address)."""
    key = (device.type, -1 if device.index is None else device.index, numel)
    buf = _WORKSPACES.get(key)
    if buf is None:
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _WORKSPACES[key] = buf
    return buf


# ----------------------------------------------------------------------------------------
# Launch arguments shared by the families.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchArgs:
    """Everything a family's launch() needs besides x, out, bias and the config."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]      # zero_points or offsets, fp32 [G, N]
    perm: Optional[torch.Tensor]
    zero_mode: int
    bits: int
    group_size: int                    # effective (K for per-channel)
    num_groups: int
    n: int
    k: int


def launch_args(prepared: registry.PreparedWeight, spec: registry.WeightSpec) -> LaunchArgs:
    zp, off = prepared.zero_points, prepared.offsets
    mode = "zero_points" if zp is not None else "offsets" if off is not None else "symmetric"
    return LaunchArgs(packed=prepared.packed, scales=prepared.scales,
                      zeros=zp if zp is not None else off, perm=prepared.act_index,
                      zero_mode=ZERO_MODES[mode], bits=spec.bits,
                      group_size=effective_group_size(spec.in_features, spec.group_size),
                      num_groups=num_groups(spec.in_features, spec.group_size),
                      n=spec.out_features, k=spec.in_features)


def group_per_step(args: LaunchArgs, step_k: int) -> bool:
    """True when every K step of ``step_k`` codes lies inside one group."""
    return args.num_groups == 1 or args.group_size % step_k == 0


def run_with_config(x: torch.Tensor, args: LaunchArgs, bias: Optional[torch.Tensor],
                    cfg: TritonConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launches family ``cfg.family``; ``out`` (optional, [M, N] in x.dtype) is written."""
    from . import triton_dequant, triton_gemm, triton_gemv, triton_splitk
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, args.n, dtype=x.dtype, device=x.device)
    if args.perm is not None and cfg.family != "dequant":
        # Act-order: gather the activation columns once per call (M x K, small at the M these
        # fused families serve) so the kernels' inner loops read x contiguously; the dequant
        # family gathers into its own cached buffer.
        x = x.index_select(1, args.perm)
        args = dataclasses.replace(args, perm=None)
    if cfg.family == "gemv":
        if m != 1:
            raise ValueError(f"x: the gemv family expects M = 1, got M = {m}")
        return triton_gemv.launch(x, args, bias, cfg, out)
    if cfg.family == "splitk":
        return triton_splitk.launch(x, args, bias, cfg, out)
    if cfg.family == "dequant":
        return triton_dequant.launch(x, args, bias, cfg, out)
    return triton_gemm.launch(x, args, bias, cfg, out)


# ----------------------------------------------------------------------------------------
# The registered kernel.
# ----------------------------------------------------------------------------------------

class TritonKernel(registry.Kernel):
    name = "triton"
    backend = "triton"

    @property
    def priority(self) -> int:  # type: ignore[override]
        # Where a GPU exists: above cuda_dequant_gemm (10; at M >= 256 the Triton
        # dequant+cuBLAS family was faster on every tuned H100 shape: bench/results/
        # triton_tune_h100_r1.json vs _r2.json) and below the hand-written cuda_decode (15)
        # for the M <= 64 it serves. Without a GPU: below "reference" (0), so
        # backend="auto" never picks the (slow) interpreter by itself.
        return 12 if torch.cuda.is_available() else -1

    def available(self) -> Optional[str]:
        return TRITON_IMPORT_ERROR

    def supports(self, problem: registry.Problem) -> Optional[str]:
        if problem.device_type == "cuda":
            if problem.dtype not in (torch.float16, torch.bfloat16):
                return f"needs fp16/bf16 activations, got {problem.dtype}"
            if tuple(problem.arch) < (8, 0):
                return f"needs compute capability >= 8.0, got {problem.arch}"
            return None
        if problem.device_type == "cpu":
            if not INTERPRET_AT_IMPORT:
                return ("CPU tensors run only under the Triton interpreter "
                        "(TRITON_INTERPRET=1 set before importing dqgemm)")
            if problem.dtype != torch.float16:
                return f"the interpreter path is tested for fp16 only, got {problem.dtype}"
            return None
        return f"needs a CUDA device (or the CPU interpreter), got {problem.device_type}"

    def prepare(self, qweight) -> registry.PreparedWeight:
        return prepare_weight(qweight)

    def run(self, x, prepared, bias, spec):
        if bias is not None:
            bias = bias.contiguous()   # the kernels read bias[n] with unit stride
        args = launch_args(prepared, spec)
        cfg = choose_config(spec.bits, spec.group_size, x.dtype, x.shape[0], spec.out_features,
                            spec.in_features, x.device)
        return run_with_config(x, args, bias, cfg)


KERNEL = registry.register(TritonKernel())


def candidate_configs(bits: int, m: int) -> List[TritonConfig]:
    """Configs the tuning script (bench/triton_tune.py) tries for one M; kept small (the
    first tuning run, bench/results/triton_tune_h100_r1.json, pruned the rest)."""
    e = codes_per_word(bits)
    out: List[TritonConfig] = []
    if m == 1:
        for bn, bkw, w, cps in ((64, 64, 4, 2), (64, 64, 4, 6), (128, 32, 4, 2), (64, 32, 4, 4)):
            out.append(TritonConfig("gemv", block_m=1, block_n=bn, block_k=bkw * e,
                                    num_warps=w, num_stages=3, ctas_per_sm=cps))
        # Not yet timed: row_reduce halves the registers (INT4 64 x 32 words: 238 -> 127,
        # 64 x 64 words: 255 + 844 B of spills -> 254, no spill; bench/triton_aot_check.py),
        # shiftless saves the per-code shift.
        for bn, bkw, cps, shiftless in ((64, 32, 4, False), (128, 16, 4, False),
                                        (64, 64, 6, False), (64, 32, 4, True),
                                        (128, 16, 4, True)):
            out.append(TritonConfig("gemv", block_m=1, block_n=bn, block_k=bkw * e,
                                    num_warps=4, num_stages=3, ctas_per_sm=cps,
                                    row_reduce=True, shiftless=shiftless))
    if 2 <= m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for bn, bk, w, st, cps in ((128, 128, 4, 3, 2), (64, 128, 4, 3, 2), (128, 256, 8, 3, 2),
                                   (128, 128, 4, 3, 4)):
            out.append(TritonConfig("splitk", block_m=bm, block_n=bn, block_k=bk,
                                    num_warps=w, num_stages=st, ctas_per_sm=cps))
        out.append(TritonConfig("splitk", block_m=bm, block_n=128, block_k=16 * e,
                                num_warps=4, num_stages=3, planes=True))
        if bm == 64:
            # 4 warps spill at BLOCK_M = 64 (255 registers, bench/triton_aot_check.py); 8 do not
            out.append(TritonConfig("splitk", block_m=bm, block_n=128, block_k=128,
                                    num_warps=8, num_stages=3))
    if m >= 64:
        bm = 64 if m <= 64 else 128
        # (block_k 128 at 3 stages needs 304 KB of shared memory for per-code scales of
        # group 32/64 weights: bench/triton_aot_check.py; 64 fits every variant)
        out.append(TritonConfig("gemm", block_m=bm, block_n=128, block_k=64, num_warps=8,
                                num_stages=3 if bm == 64 else 4))
        # (w_lhs, the weight as the dot's LHS, is not a candidate. On the H200 it took
        # 1.3-1.7x this config's time at 128 tokens per tile and 0.88-2.0x at 256, and
        # the best gemm config of either form took 1.6-3.3x the time of the dequant
        # family at M = 256 and 1024: bench/results/h200_2026-12-01_s3_triton_w_lhs_tune.json,
        # NOTES.md "Prefill")
    if m >= 128:
        out.append(TritonConfig("splitk", block_m=128, block_n=128, block_k=64, num_warps=8,
                                num_stages=3))
        out.append(TritonConfig("dequant", block_m=1, block_n=128, block_k=16 * e,
                                num_warps=4, num_stages=1))
    return out
