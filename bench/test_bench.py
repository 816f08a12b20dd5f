"""pytest-benchmark cases for the kernels `python -m dqgemm bench` times (GPU only).

    python -m pytest bench/test_bench.py --benchmark-only                  # all cases
    python -m pytest bench/test_bench.py -k "auto and int4" --benchmark-only
    python -m pytest bench/test_bench.py --benchmark-json out.json

Cases: two Llama-3-8B layer shapes (O: 4096x4096, down: 14336x4096) x M in (1, 16, 256) x
every method of the CLI (FP16/BF16 cuBLAS, torch's INT4 kernel, gemlite if installed,
dqgemm "auto", each backend, each registered kernel where its backend would not pick it),
INT4 g128 and INT8 per-channel. Each case is checked against the fp32 product first (a
wrong result fails the test instead of being timed), then one round = one replay of a CUDA
graph that calls the method once per weight copy (copies > 3x L2, cold L2 as in the CLI),
plus a synchronize; ``extra_info`` holds the per-call microseconds (round time / copies)
and the CLI's own CUDA-event median for the same case. Skips without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dqgemm.bench import cases, runner, timing
from dqgemm.bench.shapes import Shape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = (Shape(4096, 4096, "o"), Shape(14336, 4096, "down"))
MS = (1, 16, 256)
METHODS = cases.build_methods(cases.backend_tokens("all"), [4, 8], torch.float16,
                              reference_max_kn=4096 * 4096, reference_max_m=256)


def _id(method) -> str:
    return f"{method.backend}-int{method.bits}" if method.bits != 16 else method.backend


@pytest.fixture(scope="module")
def stores():
    made = {}

    def get(shape: Shape) -> cases.WeightStore:
        if shape not in made:
            made.clear()            # one shape's weights at a time
            torch.cuda.empty_cache()
            made[shape] = cases.WeightStore(shape, torch.device("cuda"), cases.QuantSettings(),
                                            seed=shape.k * 7 + shape.n)
        return made[shape]
    return get


@pytest.mark.parametrize("method", METHODS, ids=_id)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer(benchmark, stores, shape, m, method):
    store = stores(shape)
    reason = method.unsupported(store, m)
    if reason:
        pytest.skip(reason)
    calls = method.calls(store, m)
    out = calls[0]()
    torch.cuda.synchronize()
    err = runner._rel_error(out, method.expected(store, m))
    tol = runner.TOLERANCE[method.dtype]
    assert torch.isfinite(out).all() and err <= tol, f"relative error {err:.2e} > {tol:.0e}"
    cli = timing.time_calls(calls, store.device)          # also warms up and tests capture

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=timing.MIN_REPS, warmup_rounds=3, iterations=1)
    del outs
    benchmark.extra_info.update(
        shape=[shape.k, shape.n], M=m, bits=method.bits, backend=method.backend,
        kernel=method.kernel_name(store, m), copies=len(calls), rel_error=err,
        us_per_call=benchmark.stats.stats.median * 1e6 / len(calls), cli_us=cli.us,
        cli_eager_us=cli.eager_us)
