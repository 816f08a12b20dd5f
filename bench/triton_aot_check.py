"""Compile the Triton kernels for a GPU target on a machine without a GPU; report resources.

    python bench/triton_aot_check.py                  # shipped table + heuristic configs
    python bench/triton_aot_check.py --candidates     # + every tuning candidate
    python bench/triton_aot_check.py --quick          # one variant per family (CI)
    python bench/triton_aot_check.py --json out.json

Each (config, weight variant) is compiled by Triton for sm_<arch> (default 90) with its own
ptxas; ptxas -v on the PTX gives registers and spills; Triton's metadata gives the shared
memory. Exit status 1 if any variant fails to compile or needs more shared memory than the
target has (227 KB per block on sm_90): what would otherwise surface only on the GPU
(OutOfResources, GPU-only compile errors) is caught on a CPU machine.

Needs triton, no GPU, no CUDA driver. TRITON_INTERPRET must be unset (it is removed here
before dqgemm is imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dqgemm.kernels import (triton_common as tc, triton_dequant, triton_gemm,  # noqa: E402
                            triton_gemv, triton_splitk)

SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912}   # bytes per block (opt-in maximum)
FAMILY_KERNELS = {
    "gemv": (triton_gemv, "_gemv_kernel"),
    "splitk": (triton_splitk, "_splitk_kernel"),
    "gemm": (triton_gemm, "_gemm_kernel"),
    "dequant": (triton_dequant, "_dequant_kernel"),
}
POINTER_TYPES = {"w_ptr": "*i32", "perm_ptr": "*i32", "z_ptr": "*fp32", "ws_ptr": "*fp32",
                 "s_ptr": "*fp16"}


@dataclasses.dataclass(frozen=True)
class Variant:
    bits: int
    zero_mode: int          # 0 symmetric, 1 zero_points, 2 offsets
    act_order: bool
    group_per_step: bool
    has_bias: bool
    use_ws: bool
    dtype: str = "fp16"


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import _path_to_binary
        return _path_to_binary("ptxas")[0]
    except Exception:  # pragma: no cover - older/newer triton layouts
        return "ptxas"


def compile_one(cfg: tc.TritonConfig, v: Variant, arch: int):
    module, name = FAMILY_KERNELS[cfg.family]
    fn = getattr(module, name)
    consts = module.constexprs(cfg, v.bits, v.zero_mode, v.act_order, v.group_per_step,
                               v.has_bias, v.use_ws)
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = POINTER_TYPES.get(arg, "*" + v.dtype)
        else:
            sig[arg] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): val for k, val in consts.items()})
    t0 = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps,
                                     "num_stages": cfg.num_stages})
    seconds = time.time() - t0
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    arch_flag = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    res = subprocess.run([_ptxas(), f"-arch={arch_flag}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return {"shared_bytes": int(kernel.metadata.shared),
            "registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "compile_s": round(seconds, 2)}


def variants_for(cfg: tc.TritonConfig, bits: int, quick: bool):
    """A few weight variants that exercise the kernel's compile-time branches."""
    out = [Variant(bits, 0, False, True, False, cfg.family in ("gemv", "splitk"))]
    if not quick:
        out.append(Variant(bits, 1, True, False, True, False, "bf16"))
        out.append(Variant(bits, 2, False, True, True, cfg.family in ("gemv", "splitk")))
    return out


def configs(args):
    seen = []
    if args.quick:
        for bits in (4, 8):
            e = 32 // bits
            lean = bits == 4   # the register-saving gemv options on one of the two
            seen += [(bits, tc.TritonConfig("gemv", block_m=1, block_n=64, block_k=32 * e,
                                            shiftless=lean, row_reduce=lean,
                                            prefetch=not lean)),
                     (bits, tc.TritonConfig("splitk", block_m=16, block_n=128, block_k=128)),
                     (bits, tc.TritonConfig("splitk", block_m=16, block_n=128, block_k=16 * e,
                                            planes=True)),
                     (bits, tc.TritonConfig("gemm", block_m=128, block_n=128, block_k=64,
                                            num_warps=8)),
                     (bits, tc.TritonConfig("gemm", block_m=128, block_n=128, block_k=64,
                                            num_warps=8, w_lhs=True)),
                     (bits, tc.TritonConfig("dequant", block_m=1, block_n=128,
                                            block_k=16 * e, num_stages=1))]
        return seen
    for _, entries in tc.config_table():
        for e in entries:
            for bits in ((e.bits,) if e.bits else (4, 8)):
                seen.append((bits, e.config))
    for bits in (4, 8):
        for m in (1, 16, 64, 1024):
            seen.append((bits, tc.heuristic_config(bits, 128, m, 4096, 4096,
                                                   torch_device_cuda())))
            if args.candidates:
                seen += [(bits, c) for c in tc.candidate_configs(bits, m)]
    unique = []
    for item in seen:
        if item not in unique:
            unique.append(item)
    return unique


def torch_device_cuda():
    import torch
    return torch.device("cuda")   # a name only: the heuristic queries nothing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    limit = SMEM_LIMIT.get(args.arch, 101376)
    rows, failures = [], 0
    for bits, cfg in configs(args):
        for v in variants_for(cfg, bits, args.quick):
            row = {"config": dataclasses.asdict(cfg), "variant": dataclasses.asdict(v)}
            try:
                row.update(compile_one(cfg, v, args.arch))
                row["ok"] = row["shared_bytes"] <= limit
                if not row["ok"]:
                    row["error"] = f"shared memory {row['shared_bytes']} > {limit}"
            except Exception as exc:
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            failures += not row["ok"]
            rows.append(row)
            c = cfg
            print(f"{c.family:8s} bits={bits} bm={c.block_m:3d} bn={c.block_n:3d} "
                  f"bk={c.block_k:4d} w={c.num_warps} st={c.num_stages} "
                  f"{'planes ' if c.planes else ''}{'shiftless ' if c.shiftless else ''}"
                  f"{'w_lhs ' if c.w_lhs else ''}"
                  f"zm={v.zero_mode} act={int(v.act_order)} gps={int(v.group_per_step)} "
                  f"{v.dtype}: " + (f"smem={row['shared_bytes']} regs={row['registers']} "
                                    f"spill={row['spill_store_bytes']}"
                                    if "shared_bytes" in row else "") +
                  ("" if row["ok"] else f"  FAILED {row['error']}"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)
    print(f"{len(rows)} variants, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
