"""The end-to-end decode step on a GPU: programmatic launches change no result."""

import pytest
import torch

from dqgemm.bench import e2e
from _util import capture_graph


def _reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return "programmatic dependent launch needs compute capability 9.0+"
    if e2e.e2e_ops.TRITON_ERROR is not None:
        return e2e.e2e_ops.TRITON_ERROR
    return None


@pytest.mark.skipif(_reason() is not None, reason=str(_reason()))
@pytest.mark.parametrize("variant", ["fp16", "int4", "int8"])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_programmatic_launch_step_equals_normal_step(variant, batch, monkeypatch):
    """Two layers of the Llama-3-8B shape, one decode step replayed from a CUDA graph with
    and without dqgemm.programmatic_launch(): the kernels are deterministic, so a missing
    wait for a previous kernel's output would show as a difference in the logits (poisoned
    before each replay) or in the KV caches. Both runs use the grids of the programmatic
    one (the launch table may size them differently for programmatic launches, and another
    stream-K split sums in another order)."""
    from dqgemm.kernels import cuda_decode
    table = cuda_decode.table_blocks_per_sm
    monkeypatch.setattr(cuda_decode, "table_blocks_per_sm",
                        lambda m, bits, units=None, programmatic=False:
                        table(m, bits, units, programmatic=True))
    cfg = e2e.MODELS["llama3-8b"]
    bits = e2e.VARIANTS[variant]
    outs = []
    for pdl in (False, True):
        torch.manual_seed(0)
        # backend "cuda", not "auto": dispatch may pick another kernel inside
        # dqgemm.programmatic_launch() (configs/dispatch.json), and this compares launches
        net = e2e.DecoderModel(cfg, 2, bits, 128, "cuda", "cuda", torch.float16,
                               elementwise="triton", programmatic_launch=pdl).eval()
        state = e2e._new_state(net, batch, 320, 200, "cuda", torch.float16)
        with torch.no_grad():
            net.step(state)                    # eager: first launches, prepared weights
            state.pos.fill_(200)
            graph = capture_graph(lambda: net.step(state))
            state.pos.fill_(200)
            for _ in range(3):                 # three steps: positions 200, 201, 202
                state.logits.fill_(float("nan"))
                graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(state.logits).all()
        outs.append((state.logits.clone(), state.tokens.clone(),
                     [c[:, :, 198:204].clone() for c in state.k_caches + state.v_caches]))
        del net, state, graph
        torch.cuda.empty_cache()
    (l0, t0, c0), (l1, t1, c1) = outs
    assert torch.equal(l0, l1)
    assert torch.equal(t0, t1)
    for a, b in zip(c0, c1):
        assert torch.equal(a, b)
