"""``benchmarks/profile_host.py``'s pieces: the op's copy, the launches it prepares apart, and
the layers of an eager call it times one by one. Kept apart from ``test_benchmarks.py`` (whose
runs of whole benchmarks the GPU session leaves to CI) so that the GPU paths are tested where a
GPU is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_profile_host_keeps_a_copy_of_the_op_registered_through_register_autograd(monkeypatch):
    """``profile_host.py --register-autograd``'s copy computes what the op computes, and its
    gradient goes through torch's registration (the copy's own backward)."""
    import fourbit.functional as F4

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_host

    copy = profile_host.register_autograd_copy()
    packed, state = F4.quantize_4bit(torch.randn(48, 96), quant_type="nf4", blocksize=64)
    A = torch.randn(3, 96, requires_grad=True)
    arguments = (packed, state.absmax, state.code, 64, [48, 96])
    out = copy(A, *arguments)
    assert torch.equal(out, torch.ops.fourbit.linear_4bit(A, *arguments))
    with pytest.raises(RuntimeError, match="profiling copy of the op has no gradient"):
        out.sum().backward()


def test_profile_host_prepares_a_launch_without_dependent_launches(monkeypatch):
    """``profile_host.py --no-dependent``: the module's first call (which prepares its launch)
    sees the few-row kernels' dependent launches switched off, later calls the library as it was."""
    pytest.importorskip("triton")
    from fourbit.kernels.triton import fragment_groups, fragments

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_host

    cuda = torch.device("cuda")
    originals = fragments.dependent_launches, fragment_groups.dependent_launches
    seen = []

    def module(x):
        seen.append((fragments.dependent_launches, fragment_groups.dependent_launches, x))
        return x

    x = torch.ones(2)
    call = profile_host.without_dependent_launches(module, x)
    ((first, second, given),) = seen
    assert given is x and first not in originals and second not in originals
    assert first(cuda) is False and second(cuda) is False
    assert (fragments.dependent_launches, fragment_groups.dependent_launches) == originals
    assert call() is x and seen[1][:2] == originals  # later calls: the library as it was


def test_profile_host_breaks_an_eager_call_into_its_layers(monkeypatch):
    """``profile_host.py --layers``: each layer's call gives the module's output where it returns
    one; a module whose call is not one kept kernel launch (the CPU's) has no layers to time."""
    import fourbit

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_host

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = fourbit.nn.Linear4bit(256, 128, **profile_host.SETTINGS).to(device)
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=device)
    calls = profile_host.layer_calls(module, x)
    if device == "cpu":
        assert calls == {}
        return
    with torch.no_grad():
        expected = module(x)
        for name in ("  Linear4bit.forward", "  ops.PreparedLinear", "  PreparedWeight.linear", "  ProductLaunch"):
            torch.testing.assert_close(calls[name](), expected, msg=name)  # split K may sum in another order
    calls["  KernelLaunch.run"]()
    assert calls["  the output's torch.empty"]().shape == expected.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the two-kernel paths are CUDA's")
@pytest.mark.parametrize("path", ["chunked", "staged"])
def test_profile_host_breaks_two_kernel_calls_into_the_path_they_take(monkeypatch, path):
    """``profile_host.py --layers`` on the calls of two kernels: the chunked path's decode and
    cuBLAS product, and the ``wgmma`` launch's input staging, each timed apart and each giving
    what the call computes from it."""
    import fourbit
    from fourbit.kernels.triton import dispatch

    if path == "staged" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs compute capability 9.0")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_host

    config = "chunked" if path == "chunked" else ("wgmma",)
    monkeypatch.setattr(dispatch, "choose_config", lambda *arguments, **options: config)
    module = fourbit.nn.Linear4bit(256, 128, **profile_host.SETTINGS).cuda()
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    calls = profile_host.layer_calls(module, x)
    with torch.no_grad():
        expected = module(x)
        for name in ("  Linear4bit.forward", "  ops.PreparedLinear", "  PreparedWeight.linear"):
            torch.testing.assert_close(calls[name](), expected, msg=name)
        if path == "chunked":
            state = module.weight.quant_state  # decoded in the state's dtype, then to the input's
            decoded = fourbit.functional.dequantize_4bit(module.weight.data, state).to(x.dtype)
            torch.testing.assert_close(calls["  the weight's decode (a kernel)"](), decoded)
            torch.testing.assert_close(calls["  F.linear with the decoded weight"](), expected)
            assert calls["  the decoded weight's torch.empty"]().shape == decoded.shape
            assert "  ProductLaunch" not in calls
        else:
            torch.testing.assert_close(calls["  ProductLaunch"](), expected)
            assert calls["  the input's staging (a kernel)"]().dtype == torch.int32
            calls["  KernelLaunch.run"]()
