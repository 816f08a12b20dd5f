"""`python -m dqgemm info`: version, extension status, devices seen, backends usable."""

from __future__ import annotations

import platform
from typing import Dict, List

import torch

from . import __version__, _ext, registry


def _probe_problem(device_type: str, name: str = "", arch=(0, 0)) -> registry.Problem:
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    return registry.Problem(m=1, n=4096, k=4096, bits=4, group_size=128, dtype=dtype,
                            scale_dtype=torch.float16, zero_mode="symmetric", act_order=False,
                            device_type=device_type, device_name=name, arch=arch)


def collect() -> Dict:
    ext = _ext.extension()
    facts = {
        "dqgemm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": ("built for sm_" + ext.COMPILED_ARCHS.replace(";", ", sm_")
                      if ext is not None else _ext.extension_error()),
        "gpus": [],
        "kernels": {},
    }
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = "not installed"
    problems = [("cpu", _probe_problem("cpu"))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cap = (props.major, props.minor)
            facts["gpus"].append(f"cuda:{i} {props.name} (sm_{cap[0]}{cap[1]}, "
                                 f"{props.multi_processor_count} SMs, "
                                 f"{props.total_memory / 2**30:.0f} GiB)")
            if i == 0:
                problems.append(("cuda:0", _probe_problem("cuda", props.name, cap)))
    for where, problem in problems:
        facts["kernels"][where] = {k.name: (k.backend, reason or "usable")
                                   for k, reason in registry.candidates(problem)}
    return facts


def format_info(facts: Dict) -> str:
    lines: List[str] = []
    for key in ("dqgemm", "python", "torch", "torch_cuda", "triton", "extension"):
        lines.append(f"{key + ':':<12} {facts[key]}")
    lines.append(f"{'gpus:':<12} {', '.join(facts['gpus']) or 'none visible'}")
    for where, kernels in facts["kernels"].items():
        lines.append(f"kernels on {where} (INT4 g128 fp16 M=1 probe):")
        for name, (backend, status) in kernels.items():
            lines.append(f"  {name:<24} {backend:<10} {status}")
    return "\n".join(lines)


def main(args=None) -> int:
    print(format_info(collect()))
    return 0
