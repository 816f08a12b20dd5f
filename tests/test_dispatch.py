"""The dispatch rules (configs/dispatch.json): consistent, backed by committed results."""

import os
import re

import torch

from dqgemm import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(m, n=8192, bits=4, dtype=torch.float16, name="NVIDIA H100 80GB HBM3",
             programmatic_launch=False):
    return registry.Problem(m=m, n=n, k=8192, bits=bits, group_size=128, dtype=dtype,
                            scale_dtype=torch.float16, zero_mode="symmetric", act_order=False,
                            device_type="cuda", device_name=name, arch=(9, 0),
                            programmatic_launch=programmatic_launch)


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


def test_programmatic_launch_rule():
    """Inside dqgemm.programmatic_launch() INT8 M = 1 goes to cuda_decode on the H200 (it
    launches programmatically, the Triton GEMV does not; measured end to end); outside it
    the kernel-only split by N stays."""
    h200 = "NVIDIA H200"
    assert _first_rule(_problem(1, bits=8, n=4096, name=h200)) == "triton"
    assert _first_rule(_problem(1, bits=8, n=4096, name=h200,
                                programmatic_launch=True)) == "cuda_decode"
    assert _first_rule(_problem(1, bits=8, n=28672, name=h200)) == "cuda_decode"
    assert _first_rule(_problem(1, bits=4, n=4096, name=h200, programmatic_launch=True)) == \
        _first_rule(_problem(1, bits=4, n=4096, name=h200))


def test_make_problem_reads_the_launch_policy_on_cuda_only():
    import dqgemm
    from dqgemm import ops
    qw = dqgemm.quantize(torch.randn(64, 128) * 0.02, 8, -1)
    x = torch.randn(1, 128, dtype=torch.float16)
    with dqgemm.programmatic_launch():
        problem = ops.make_problem(x, qw.qdata, qw.scales, None, None, None, 8, -1)
    assert problem.programmatic_launch is False  # a CPU tensor: never


def test_unmeasured_gpu_falls_back_to_generic_rules():
    assert _first_rule(_problem(8, name="NVIDIA A100-SXM4-80GB")) == "cuda_decode"
    a100_large = _problem(1024, name="NVIDIA A100-SXM4-80GB")
    assert not any(r.matches(a100_large) for r in registry.dispatch_rules()
                   if r.kernel != "reference")


def test_select_skips_rules_whose_kernel_cannot_serve():
    # On this machine the CUDA kernels may be unavailable: select must still answer.
    kernel = registry.select(_problem(1), "auto")
    assert kernel.name in {k.name for k in registry.all_kernels()}
