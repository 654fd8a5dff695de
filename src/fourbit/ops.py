"""The ``fourbit::`` custom ops: schemas, fake (meta) implementations, and the kernel per device.

This is the only module that chooses a kernel. Every op's default implementation is the
plain-PyTorch reference, which runs on any device; faster kernels register themselves here
for the devices they serve. Callers use ``torch.ops.fourbit.<name>`` (through
``fourbit.functional``) and never look at ``device.type`` themselves.

Ops take valid arguments: ``fourbit.functional`` checks them first. Annotations are evaluated at
import time (no ``from __future__ import annotations``) because torch infers the schemas from them.
"""

import os
import warnings
from collections.abc import Callable
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import layout
from .formats import NESTED_BLOCKSIZE, NestedStatistics, nested_op_arguments, num_blocks, packed_nbytes
from .kernels import reference
from .kernels.triton_support import MIN_TRITON, triton_enabled, triton_version
from .ops_autograd import linear_4bit_autograd, register_direct_kernel, save_for_backward, saved_tensors

__all__ = [
    "PreparedLinear",
    "dequantize_4bit",
    "dequantize_blockwise",
    "linear_4bit",
    "prefers_tiles",
    "quantize_4bit",
    "quantize_blockwise",
    "run",
    "triton_enabled",
    "triton_version",
]


@torch.library.custom_op("fourbit::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, code: Tensor, blocksize: int, quant_storage: torch.dtype) -> tuple[Tensor, Tensor]:
    """Blockwise 4-bit quantization of ``A`` against the 16-entry ``code``: (packed, absmax)."""
    return reference.quantize_4bit(A, code, blocksize, quant_storage)


@quantize_4bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int, quant_storage: torch.dtype) -> tuple[Tensor, Tensor]:
    n = A.numel()
    packed = A.new_empty((packed_nbytes(n) // quant_storage.itemsize, 1), dtype=quant_storage)
    return packed, A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32)


@torch.library.custom_op("fourbit::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    nested_offset: Optional[Tensor] = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> Tensor:
    """Decode packed 4-bit data (in rows, or ``tiled`` in ``layout``'s tiles) to ``dtype`` of
    ``shape``; nested statistics are decoded on the way."""
    return layout.decoding_tiles_too(reference.dequantize_4bit)(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, nested_offset, nested_blocksize,
        tiled,
    )  # fmt: skip


@dequantize_4bit.register_fake
def _(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    nested_offset: Optional[Tensor] = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> Tensor:
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("fourbit::quantize_blockwise", mutates_args=())
def quantize_blockwise(
    A: Tensor, code: Tensor, blocksize: int, offset: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of ``A`` (minus the float32 scalar ``offset``, when given)
    against a sorted ``code``: (uint8 codes, absmax)."""
    return reference.quantize_blockwise(A, code, blocksize, offset)


@quantize_blockwise.register_fake
def _(A: Tensor, code: Tensor, blocksize: int, offset: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    absmax = A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return torch.empty_like(A, dtype=torch.uint8), absmax


@torch.library.custom_op("fourbit::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """Decode 8-bit blockwise codes to ``dtype``."""
    return reference.dequantize_blockwise(A, absmax, code, blocksize, dtype)


@dequantize_blockwise.register_fake
def _(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(A, dtype=dtype)


#: ``fourbit::linear_4bit`` runs once per projection and token, so it is defined through a plain
#: ``torch.library.Library`` rather than ``custom_op``, whose wrapper layers cost about a third of
#: the dispatch (20 us against 14 on a 2-core CPU, gradient formula registered in both), with an
#: Autograd kernel of its own (``ops_autograd``) rather than ``register_autograd``'s.
_LIBRARY = torch.library.Library("fourbit", "FRAGMENT")
_LIBRARY.define(
    "linear_4bit(Tensor A, Tensor packed, Tensor absmax, Tensor code, SymInt blocksize, SymInt[] shape, "
    "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, "
    f"SymInt nested_blocksize={NESTED_BLOCKSIZE}, bool tiled=False) -> Tensor"
)


def _linear_4bit_reference(
    A: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    shape: Sequence[int],
    bias: Optional[Tensor] = None,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    nested_offset: Optional[Tensor] = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> Tensor:
    """``A @ W.T + bias`` in A's dtype, for the packed 4-bit weight ``W`` of ``shape`` (N, K),
    stored in rows or (``tiled``) in ``layout``'s tiles."""
    return reference.linear_4bit(
        A, layout.as_rows(packed, shape, tiled), absmax, code, blocksize, shape, bias, nested_absmax, nested_code,
        nested_offset, nested_blocksize,
    )  # fmt: skip


_LIBRARY.impl("linear_4bit", _linear_4bit_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fourbit::linear_4bit", lib=_LIBRARY)
def _(
    A: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    shape: Sequence[int],
    bias: Optional[Tensor] = None,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    nested_offset: Optional[Tensor] = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> Tensor:
    return A.new_empty((*A.shape[:-1], shape[0]))


#: ``A @ W.T + bias`` through the dispatcher (``torch.ops.fourbit.linear_4bit``).
linear_4bit = torch.ops.fourbit.linear_4bit


_LIBRARY.impl("linear_4bit", linear_4bit_autograd, "Autograd", with_keyset=True)


#: Per device type, the class that prepares one weight's product for that device's kernels
#: (``PreparedWeight(packed, absmax, code, blocksize, shape, nested)`` with ``.linear(A, bias)``).
_prepared_kernels: dict[str, Callable[..., Any]] = {}
#: Device types whose kernels read tiled weights (``fourbit.layout``; their prepared kernels take
#: ``tiled=``); other devices' kernels read rows, and a tiled weight is converted for them.
_reads_tiles: set[str] = set()
#: Per device type, whether a weight of a (shape, blocksize) is better kept tiled on a device.
_tiling_rules: dict[str, Callable[[torch.device, Sequence[int], int], bool]] = {}


def prefers_tiles(device: torch.device, shape: Sequence[int], blocksize: int) -> bool:
    """Whether a 4-bit weight of ``shape`` and ``blocksize`` is kept tiled on ``device``: its
    kernels read tiles faster there and FOURBIT_TILED_LAYOUT is not "0"."""
    rule = _tiling_rules.get(device.type)
    return (
        rule is not None
        and layout.can_tile(shape)
        and os.environ.get("FOURBIT_TILED_LAYOUT", "") != "0"
        and rule(device, shape, blocksize)
    )


#: How an eager product reaches its prepared kernel (``_eager_route``).
_DIRECT, _AUTOGRAD = 1, 2


#: Whether a profiler listens (one C call, about 40 ns).
_profiling = torch._C._autograd._profiler_enabled


def _recorded(name: str, kernel: Callable, *args: Any, **kwargs: Any) -> Any:
    """``kernel(*args, **kwargs)``, recorded as op ``name`` when a profiler listens: the eager
    paths that skip the dispatcher would otherwise leave their time unnamed in its trace."""
    if not _profiling():
        return kernel(*args, **kwargs)
    with torch.profiler.record_function(name):
        return kernel(*args, **kwargs)


def _eager_route(A: Tensor, bias: Optional[Tensor]) -> Optional[int]:
    """How a product may skip the dispatcher: straight to the kernel (``_DIRECT``: no gradient to
    record) or through ``_PreparedProduct`` (``_AUTOGRAD``); None (the op) under torch.compile,
    for tensor subclasses, or with a torch function or dispatch mode that would want to see the
    op."""
    if type(A) is not Tensor or (bias is not None and type(bias) not in (Tensor, torch.nn.Parameter)):
        return None
    if (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() != 0
    ):
        return None
    if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
        return _AUTOGRAD
    return _DIRECT


class _PreparedProduct(torch.autograd.Function):
    """The op's gradient formula in eager autograd, on a prepared kernel: the forward is the
    kernel's product and the backward decodes the weight with the kernel's decode built once, so
    that a training step pays neither the dispatcher nor a per-call setup of the kernels."""

    @staticmethod
    def forward(ctx: Any, A: Tensor, bias: Optional[Tensor], prepared: "PreparedLinear") -> Tensor:
        ctx.prepared = prepared
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.pointer = prepared.packed.data_ptr()
        save_for_backward(ctx, prepared.packed)  # as the op saves it: autograd checks its version
        return _recorded("fourbit::linear_4bit", prepared.kernel.linear, A, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        (packed,) = saved_tensors(ctx)
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad has A's dtype
            prepared = ctx.prepared
            if packed.data_ptr() == ctx.pointer:
                weight = _recorded("fourbit::dequantize_4bit", prepared.kernel.dequantize, grad.dtype)
            else:  # the bytes moved since the forward (FSDP2 frees and gathers them again)
                weight = dequantize_4bit(packed, dtype=grad.dtype, **prepared.arguments)
            grad_A = grad @ weight
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_A, grad_bias, None


class PreparedLinear:
    """``A @ W.T + bias`` for one packed 4-bit weight, with what its kernel needs derived once.

    Where the weight's device has a prepared kernel, an eager call on plain tensors goes straight
    to it (an output allocation and a launch), through ``_PreparedProduct`` when it records a
    gradient. Every other call, under torch.compile, tensor subclasses or modes, goes through
    ``fourbit::linear_4bit`` with the arguments built here once. The tensors are the caller's:
    rebuild after replacing them.
    """

    def __init__(
        self,
        packed: Tensor,
        absmax: Tensor,
        code: Tensor,
        blocksize: int,
        shape: Sequence[int],
        nested: Optional[NestedStatistics] = None,
        tiled: bool = False,
    ) -> None:
        self.packed = packed
        self.device = packed.device
        self.bias_shape = (shape[0],)
        self.arguments = dict(
            absmax=absmax, code=code, blocksize=blocksize, shape=list(shape), **nested_op_arguments(nested), tiled=tiled
        )
        device = packed.device.type
        prepare = _prepared_kernels.get(device)
        if prepare is None or (tiled and device not in _reads_tiles):
            self.kernel = None  # the op converts a tiled weight for kernels of rows
        elif tiled:
            self.kernel = prepare(packed, absmax, code, blocksize, shape, nested, tiled=True)
        else:
            self.kernel = prepare(packed, absmax, code, blocksize, shape, nested)

    def __call__(self, A: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if A.device != self.device or (bias is not None and bias.device != self.device):
            where = f"the input is on {A.device}" + (f", the bias on {bias.device}" if bias is not None else "")
            raise ValueError(f"{where}, but the 4-bit weight is on {self.device}: move them to one device")
        if bias is not None and bias.shape != self.bias_shape:  # the kernels read bias_shape[0] values
            raise ValueError(f"bias must have shape {self.bias_shape}, got {tuple(bias.shape)}")
        if self.kernel is not None:
            route = _eager_route(A, bias)
            if route == _DIRECT:
                if _profiling():
                    return _recorded("fourbit::linear_4bit", self.kernel.linear, A, bias)
                return self.kernel.linear(A, bias)
            if route == _AUTOGRAD:
                return _PreparedProduct.apply(A, bias, self)
        return linear_4bit(A, self.packed, bias=bias, **self.arguments)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The weight decoded to ``dtype``, in rows (N, K): by the prepared kernel's decode (built
        once per dtype) in eager mode on plain tensors, else by the op."""
        if self.kernel is not None and _plain_eager_tensors([self.packed]):
            return _recorded("fourbit::dequantize_4bit", self.kernel.dequantize, dtype)
        return dequantize_4bit(self.packed, dtype=dtype, **self.arguments)


_OPS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
}
#: The kernel of each op (by name) per device type; the reference for devices without one.
_kernels: dict[tuple[str, str], Callable] = {}
_REFERENCE: dict[str, Callable] = {
    "quantize_4bit": reference.quantize_4bit,
    "dequantize_4bit": layout.decoding_tiles_too(reference.dequantize_4bit),
    "quantize_blockwise": reference.quantize_blockwise,
    "dequantize_blockwise": reference.dequantize_blockwise,
}


def _register(name: str, device: str, kernel: Callable) -> None:
    """``kernel`` serves op ``name`` on ``device``: for the dispatcher and for ``run``'s direct calls."""
    _OPS[name].register_kernel(device)(kernel)
    _kernels[(name, device)] = kernel


def run(name: str, *args: Any, **kwargs: Any) -> Any:
    """Op ``name`` (quantize or dequantize, 4- or 8-bit) on ``args``.

    An eager call on plain tensors that records no gradient goes straight to the kernel of the
    first tensor's device, which is what the dispatcher would pick; anything else (torch.compile,
    fake or meta tensors, subclasses, modes, gradients) goes through ``torch.ops.fourbit.<name>``.
    Besides the dispatcher's host time, the direct call skips the import of torch._dynamo that a
    custom op's first call makes (about a second).
    """
    tensors = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, Tensor)]
    if all(type(tensor) is Tensor for tensor in tensors) and _plain_eager_tensors(tensors):
        kernel = _kernels.get((name, tensors[0].device.type)) or _REFERENCE[name]
        return _recorded(f"fourbit::{name}", kernel, *args, **kwargs)
    return getattr(torch.ops.fourbit, name)(*args, **kwargs)


def _plain_eager_tensors(tensors: Sequence[Tensor]) -> bool:
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return False
    if any(tensor.device.type == "meta" for tensor in tensors):
        return False
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _register_triton_kernels() -> None:
    """CUDA tensors run the Triton kernels; every other device keeps the reference."""
    from .kernels import triton as triton_kernels

    _prepared_kernels["cuda"] = triton_kernels.PreparedWeight
    _reads_tiles.add("cuda")
    _tiling_rules["cuda"] = triton_kernels.prefers_tiles
    _register("quantize_4bit", "cuda", triton_kernels.quantize_4bit)
    _register("quantize_blockwise", "cuda", triton_kernels.quantize_blockwise)
    _register("dequantize_4bit", "cuda", triton_kernels.dequantize_4bit)
    _LIBRARY.impl("linear_4bit", triton_kernels.linear_4bit, "CUDA")
    register_direct_kernel(torch._C.DispatchKey.CUDA, triton_kernels.linear_4bit)


def _register_cpu_kernels() -> None:
    """CPU tensors run the native kernels, else the compiled path, else the reference (each
    falls back to the next by itself)."""
    from .kernels import cpu

    _prepared_kernels["cpu"] = cpu.prepare
    _register("quantize_4bit", "cpu", cpu.quantize_4bit)
    _register("dequantize_4bit", "cpu", layout.decoding_tiles_too(cpu.dequantize_4bit))
    product = layout.multiplying_tiles_too(cpu.linear_4bit)
    _LIBRARY.impl("linear_4bit", product, "CPU")
    register_direct_kernel(torch._C.DispatchKey.CPU, product)


_register_cpu_kernels()
if triton_enabled() and torch.cuda.is_available():
    _register_triton_kernels()
elif torch.cuda.is_available() and (triton_version() or MIN_TRITON) < MIN_TRITON:
    warnings.warn(
        f"fourbit's Triton kernels need Triton {'.'.join(map(str, MIN_TRITON))} or newer, found "
        f"{'.'.join(map(str, triton_version()))}: CUDA tensors use the slower PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )
