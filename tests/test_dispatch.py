"""The dispatch rules (configs/dispatch.json): consistent, backed by committed results."""

import os
import re

import torch

from dqgemm import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(m, n=8192, bits=4, dtype=torch.float16, name="NVIDIA H100 80GB HBM3"):
    return registry.Problem(m=m, n=n, k=8192, bits=bits, group_size=128, dtype=dtype,
                            scale_dtype=torch.float16, zero_mode="symmetric", act_order=False,
                            device_type="cuda", device_name=name, arch=(9, 0))


def _first_rule(problem):
    return next(r.kernel for r in registry.dispatch_rules() if r.matches(problem))


def test_rules_name_registered_kernels_and_their_evidence():
    names = {k.name for k in registry.all_kernels()}
    for rule in registry.dispatch_rules():
        assert rule.kernel in names, rule
        assert rule.note, f"rule without a note: {rule}"
        for path in re.findall(r"bench/results/[\w.\-]+", rule.note):
            assert os.path.isfile(os.path.join(ROOT, path)), f"{rule.kernel}: missing {path}"


def test_h100_rules_follow_the_measured_crossovers():
    assert _first_rule(_problem(1)) == "cuda_decode"
    assert _first_rule(_problem(1, bits=8, n=8192)) == "triton"
    assert _first_rule(_problem(1, bits=8, n=57344)) == "cuda_decode"
    assert _first_rule(_problem(16)) == "cuda_decode"
    assert _first_rule(_problem(32)) == "cuda_decode"
    assert _first_rule(_problem(33)) == "triton"
    assert _first_rule(_problem(4096, bits=8)) == "triton"
    assert _first_rule(_problem(4, dtype=torch.float32)) == "reference"


def test_unmeasured_gpu_falls_back_to_generic_rules():
    assert _first_rule(_problem(8, name="NVIDIA A100-SXM4-80GB")) == "cuda_decode"
    a100_large = _problem(1024, name="NVIDIA A100-SXM4-80GB")
    assert not any(r.matches(a100_large) for r in registry.dispatch_rules()
                   if r.kernel != "reference")


def test_select_skips_rules_whose_kernel_cannot_serve():
    # On this machine the CUDA kernels may be unavailable: select must still answer.
    kernel = registry.select(_problem(1), "auto")
    assert kernel.name in {k.name for k in registry.all_kernels()}
