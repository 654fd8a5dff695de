"""Launching kernels with little host work: compiled once, then launched directly.

Triton's ``kernel[grid](...)`` binds and specializes every argument on every call, which costs
more host time than a decode-sized product takes on the GPU. A ``KernelLaunch`` goes through the
JIT once, which compiles (or finds) the kernel, and later hands the arguments straight to the
compiled kernel's launcher, pointers as ints. A ``ProductLaunch`` fixes all of a product's
arguments but the input, the bias and the output. Whoever keeps one keys it on everything Triton
specializes on that can change between calls (the input's row count, stride and 16-byte
alignment, the bias' alignment).

Split-K products add their partial sums into a float32 workspace and count arrivals per output
tile; the last program of a tile writes the output and leaves workspace and counters zeroed
(``common.write_output``). So one zeroed workspace per device and stream serves every launch,
and no kernel runs before or after the product. A launch captured into a CUDA graph takes a
workspace of its own instead, as replays may run on another stream.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import types
from collections.abc import Callable, Sequence

import torch
import triton

try:
    from triton import knobs
except ImportError:  # Triton before 3.4 keeps the launch hooks on CompiledKernel
    knobs = None

from ..kept_memory import kept_on_device
from .common import COMPILE_OPTIONS, INTERPRETED


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


#: Whether launches may bypass the JIT: Triton 3.3 and newer pass every bound argument, in the
#: order of the signature, to the compiled kernel's launcher; the interpreter compiles nothing.
DIRECT = not INTERPRETED and _version(triton.__version__) >= (3, 3)
#: The Tritons whose launch of a kernel packed with ``num_ctas`` of C launches the grid's first
#: dimension times C programs in clusters of C (checked against their sources), so that a kernel
#: compiled for one program a cluster may be launched in clusters (``KernelLaunch``'s ``cluster``).
_CLUSTER_TRITONS = ((3, 6), (3, 9))
CLUSTER_LAUNCH = DIRECT and _version(triton.__version__) in _CLUSTER_TRITONS

_workspaces: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def split_buffers(device: torch.device, values: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed float32 workspace of at least ``values`` elements and zeroed int32 counters for
    at least ``tiles`` tiles; split-K kernels leave both zeroed again."""
    cuda = device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():
        return _zeroed(device, values, tiles)
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if cuda else 0)
    buffers = _workspaces.get(key)
    if buffers is None or buffers[0].numel() < values or buffers[1].numel() < tiles:
        values = max(values, buffers[0].numel() if buffers else 0)
        tiles = max(tiles, buffers[1].numel() if buffers else 0)
        # allocated off the calling thread: inside torch.compile's CUDA graph trees, a kept
        # allocation would sit in their memory pool untracked
        buffers = _workspaces[key] = kept_on_device(device, lambda: _zeroed(device, values, tiles))
    return buffers


def _zeroed(device: torch.device, values: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed float32 workspace and int32 counters, filled by one kernel (counters 16-byte aligned)."""
    start = -(-values // 4) * 4
    buffer = torch.zeros(start + tiles, dtype=torch.float32, device=device)
    return buffer[:values], buffer[start:].view(torch.int32)


class KernelLaunch:
    """One Triton kernel with a fixed grid and options, launched with little host work.

    The first call goes through the JIT, which compiles (or finds) the kernel; once ``direct()``,
    ``run`` hands the arguments (all of them, in the order of the signature) straight to the
    compiled kernel's launcher on the current stream. ``run`` takes pointer arguments as data
    pointers (ints) too: the launcher then skips its ``data_ptr()`` call and its driver query of
    each pointer, which costs more than the rest of a decode-sized launch. Whoever keeps one keys
    it on everything Triton specializes on.

    ``options`` (Triton's: ``num_warps`` ...) come on top of ``common.COMPILE_OPTIONS``.
    ``registers`` (non-zero) is what a thread of the kernel should be allowed: when ptxas gives
    it less than ``REGISTER_SHORTFALL`` of that on its own, the kernel is compiled again with
    ``maxnreg=registers`` (``needs_register_budget``).

    ``extra_shared`` (non-zero) is dynamic shared memory the kernel uses past what Triton gave it
    (PTX that addresses the end of it): the launch adds it, and always launches directly, with the
    hooks of a profiler left out, as only the direct launch carries it. ``head_shared`` (non-zero)
    is how much of the dynamic shared memory's start the kernel's PTX leaves to Triton (it keeps
    data at fixed offsets past it): the compile fails clearly when Triton takes more.

    ``cluster`` (above 1) launches the grid's programs in thread block clusters of that many
    (Hopper and newer): ``grid`` counts clusters, and a program's index is its cluster's times
    ``cluster`` plus its rank in it. Such launches are direct too.
    """

    __slots__ = (
        "cluster",
        "compiled",
        "compiled_registers",
        "device",
        "extra_shared",
        "grid",
        "head_shared",
        "kernel",
        "options",
        "raw",
        "registers",
    )

    def __init__(
        self,
        kernel: triton.JITFunction,
        grid: Sequence[int],
        options: dict,
        device: torch.device,
        registers: int = 0,
        extra_shared: int = 0,
        head_shared: int = 0,
        cluster: int = 1,
    ) -> None:
        if extra_shared and not DIRECT:
            found = "the Triton interpreter" if INTERPRETED else f"Triton {triton.__version__}"
            raise RuntimeError(
                f"kernels with dynamic shared memory of their own need Triton 3.3 or newer on a GPU, not {found}"
            )
        if cluster > 1 and not CLUSTER_LAUNCH:
            known = " or ".join(".".join(map(str, version)) for version in _CLUSTER_TRITONS)
            raise RuntimeError(f"launches in thread block clusters need Triton {known}, not {triton.__version__}")
        self.kernel = kernel
        self.cluster = cluster
        self.extra_shared = extra_shared
        self.head_shared = head_shared
        self.grid = (*grid, 1, 1)[:3]
        self.options = {**COMPILE_OPTIONS, **options}
        self.device = device
        self.registers = registers
        self.compiled: tuple | None = None
        #: Triton's C launch function and the arguments it takes between the stream and the
        #: kernel's (``raw_launcher``), or None: ``run`` then calls the launcher object.
        self.raw: tuple | None = None
        #: Registers a thread of the kernel the JIT compiled got (None until the first call).
        self.compiled_registers: int | None = None

    def direct(self) -> bool:
        """Whether ``run`` may launch: compiled, and nothing (a profiler) listens to launches."""
        return self.compiled is not None and (self.extra_shared or self.cluster > 1 or not _hooked())

    def __call__(self, *arguments: object) -> None:
        """Launch with tensors as the pointer arguments: directly when possible, else through the JIT."""
        if self.direct():
            self.run(*arguments)
            return
        if self.extra_shared or self.cluster > 1:
            self._compile_for_direct_launch(arguments)
            self.run(*(value.data_ptr() if isinstance(value, torch.Tensor) else value for value in arguments))
            return
        handle = self.kernel[self.grid](*arguments, **self.options)
        if needs_register_budget(handle, self.registers, self.options):
            # compiled (and loaded) now, so that no later call compiles, perhaps inside a CUDA graph capture
            self.options = {**self.options, "maxnreg": self.registers}
            handle = self.kernel.warmup(*arguments, grid=self.grid, **self.options)
            getattr(handle, "_init_handles", lambda: None)()
        self.compiled_registers = getattr(handle, "n_regs", None)
        if DIRECT and self.compiled is None and hasattr(handle, "packed_metadata"):
            self._keep(handle.run, handle.function, handle.packed_metadata)

    def _keep(self, run: Callable, function: int, metadata: tuple) -> None:
        """Keep the compiled kernel's launcher, function and metadata for ``run``."""
        self.compiled = (run, function, metadata)
        self.raw = raw_launcher(run, function, metadata)

    def _compile_for_direct_launch(self, arguments: tuple) -> None:
        """Compile (or find) the kernel and keep its launch with ``extra_shared`` more bytes of
        dynamic shared memory, allowed to the function by the driver, in clusters of ``cluster``."""
        handle = self.kernel.warmup(*arguments, grid=self.grid, **self.options)
        handle._init_handles()
        metadata = list(getattr(handle, "packed_metadata", ()))
        # Triton's CUDA backends pack (num_warps, num_ctas, shared, ...): the launch's cluster and
        # dynamic size; their launch multiplies the grid's first dimension by the cluster
        if len(metadata) < 3 or metadata[_PACKED_SHARED] != handle.metadata.shared or metadata[_PACKED_CTAS] != 1:
            raise RuntimeError(f"Triton {triton.__version__} packs its launch metadata in an unknown order: {metadata}")
        metadata[_PACKED_CTAS] = self.cluster
        if self.head_shared and handle.metadata.shared > self.head_shared:
            raise RuntimeError(
                f"Triton {triton.__version__} gave {self.kernel.__name__} {handle.metadata.shared} bytes of shared "
                f"memory of its own, where the kernel's data starts at {self.head_shared}"
            )
        shared = -(-handle.metadata.shared // 128) * 128 + self.extra_shared
        metadata[_PACKED_SHARED] = shared
        _allow_dynamic_shared(handle.function, shared)
        self.compiled_registers = getattr(handle, "n_regs", None)
        self._keep(handle.run, handle.function, tuple(metadata))

    def run(self, *arguments: object) -> None:
        """Launch the compiled kernel directly (only when ``direct()``)."""
        stream = torch._C._cuda_getCurrentRawStream(self.device.index)
        if self.raw is not None:
            launch, between = self.raw
            x, y, z = self.grid
            launch(x, y, z, stream, *between, *arguments)
            return
        run, function, metadata = self.compiled
        run(*self.grid, stream, function, metadata, None, None, None, *arguments)


#: The Tritons whose C launch function ``raw_launcher`` calls directly (checked against their
#: sources: the launch takes global and profile scratch between the dependent-launch flag and the
#: kernel's metadata), and the parameters of their Python launcher object's call.
_RAW_LAUNCH_TRITONS = ((3, 5), (3, 6))
_LAUNCHER_PARAMETERS = ("self", "gridX", "gridY", "gridZ", "stream", "function", "args")


def raw_launcher(run: object, function: int, metadata: tuple) -> tuple | None:
    """Triton's compiled C launch function behind the launcher object ``run``, with the arguments
    it takes between the stream and the kernel's; None unless ``run`` is the launcher this was
    written against and its Python call would only find no scratch memory to allocate. Calling
    the C function skips that call's frame and closures (host time on every eager product)."""
    if _version(triton.__version__) not in _RAW_LAUNCH_TRITONS:
        return None
    launch = getattr(run, "launch", None)
    try:
        parameters = tuple(inspect.signature(type(run).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if (
        parameters != _LAUNCHER_PARAMETERS
        or not isinstance(launch, types.BuiltinFunctionType)
        or getattr(run, "global_scratch_size", None) != 0
        or getattr(run, "profile_scratch_size", None) != 0
        or not hasattr(run, "launch_cooperative_grid")
        or not hasattr(run, "launch_pdl")
    ):
        return None
    # (function, cooperative grid, dependent launch, global and profile scratch, metadata,
    # launch metadata, enter and exit hooks): what the object's call passes on with no scratch
    between = (function, run.launch_cooperative_grid, run.launch_pdl, None, None, metadata, None, None, None)
    return launch, between


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


#: Where the cluster size and the dynamic shared memory size lie in a compiled kernel's
#: ``packed_metadata``.
_PACKED_CTAS = 1
_PACKED_SHARED = 2
#: ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` of the CUDA driver API.
_MAX_DYNAMIC_SHARED = 8


def _allow_dynamic_shared(function: int, size: int) -> None:
    """Let the CUDA ``function`` launch with ``size`` bytes of dynamic shared memory."""
    attribute, value = ctypes.c_int(_MAX_DYNAMIC_SHARED), ctypes.c_int(size)
    status = _driver().cuFuncSetAttribute(ctypes.c_void_p(function), attribute, value)
    if status != 0:
        raise RuntimeError(f"the CUDA driver refused a kernel {size} bytes of dynamic shared memory (error {status})")


@functools.cache
def dependent_launches(device: torch.device) -> bool:
    """Whether product kernels on ``device`` launch as programmatic dependents (compute capability
    9.0 and newer, a Triton with ``gdc_wait`` and ``launch_pdl``). Such a kernel waits at its start
    (``griddepcontrol.wait``), touching no memory before, until the kernel before it has completed,
    and lets the next one launch once its own programs have left their loops: the next product's
    programs are then resident and waiting as this one writes out. On an H200, eight Llama-3-8B
    layers' products at one row took 533 us a CUDA graph replay against 561 (8 rows: 601 against
    619); letting the next launch begin at the start, or prefetching weights into L2 before the
    wait, was slower (docs/performance.md)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(triton.language.extra.cuda, "gdc_wait")


#: The share of a kernel's register budget below which it is compiled again with the budget.
REGISTER_SHORTFALL = 7 / 8


def needs_register_budget(handle: object, registers: int, options: dict) -> bool:
    """Whether the compiled ``handle`` got fewer registers a thread than ``REGISTER_SHORTFALL`` of
    ``registers`` without a budget of its own. ptxas from CUDA 13 (Triton 3.9 compiles for Hopper
    with the 13.4 it bundles) trades registers for resident warps by default: the fragment kernel
    got 80 instead of 128 and ran 36% slower at one row and 50-100% slower at 16 rows, as its
    loads ahead need the registers."""
    if not registers or "maxnreg" in options:
        return False
    compiled = getattr(handle, "n_regs", None)
    return compiled is not None and 0 < compiled < REGISTER_SHORTFALL * registers


def pointers(tensors: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    """The data pointers of ``tensors`` (0 for None), for ``KernelLaunch.run``."""
    return tuple(0 if tensor is None else tensor.data_ptr() for tensor in tensors)


class ProductLaunch:
    """One product kernel for one weight layout and one input signature.

    The kernel's arguments are ``(x, *before, bias, out, workspace, counters, *after)``; ``after``
    is fixed, ``before`` (the weight's tensors) is ``bind(weight)`` for the weight it was built
    for, or the ``before`` given to a call: a launch serves every weight whose tensors Triton
    specializes alike. A call allocates the ``rows x columns`` output (of ``out_shape``), takes
    the workspace when the kernel splits K, and launches; ``prepare_input`` (when given) turns
    the caller's input into the kernel's ``x``; ``input_dtype`` (when given) is the dtype the kernel
    reads ``x`` as, a view of the same bytes that only the JIT launch needs (the direct launch
    takes the pointer, so an eager call makes no view); ``registers``, ``extra_shared`` and
    ``head_shared`` are ``KernelLaunch``'s.
    """

    __slots__ = (
        "_workspace",
        "after",
        "before",
        "bind",
        "columns",
        "device",
        "dtype",
        "input_dtype",
        "launch",
        "out_shape",
        "pointers",
        "prepare_input",
        "rows",
        "shared",
        "tiles",
    )

    def __init__(
        self,
        kernel: triton.JITFunction,
        grid: Sequence[int],
        options: dict[str, int],
        weight: object,
        bind: Callable[[object], tuple],
        after: tuple,
        rows: int,
        columns: int,
        dtype: torch.dtype,
        device: torch.device,
        tiles: int = 0,
        prepare_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        out_shape: Sequence[int] | None = None,
        registers: int = 0,
        extra_shared: int = 0,
        input_dtype: torch.dtype | None = None,
        head_shared: int = 0,
        cluster: int = 1,
    ) -> None:
        self.launch = KernelLaunch(kernel, grid, options, device, registers, extra_shared, head_shared, cluster)
        self.input_dtype = input_dtype
        self.bind = bind
        self.before = bind(weight)
        self.pointers = pointers(self.before)  # the tensors in ``before`` keep them valid
        self.after = after
        self.rows = rows
        self.columns = columns
        self.dtype = dtype
        self.device = device
        self.tiles = tiles  # output tiles whose K is split (0: not split)
        self.prepare_input = prepare_input
        self.out_shape = tuple(out_shape) if out_shape is not None else (rows, columns)
        self._workspace: tuple | None = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, before: tuple | None = None) -> torch.Tensor:
        if self.launch.direct():
            # a shared launch's weights are specialized alike (``PreparedWeight.layout``): the
            # binary the first weight compiled serves this one's pointers
            return self.launch_with(x, bias, self.pointers if before is None else pointers(before))
        out = torch.empty(size=self.out_shape, dtype=self.dtype, device=self.device)
        if self.prepare_input is not None:
            x = self.prepare_input(x)
        workspace, counters = self._split_buffers() if self.tiles else (out, out)  # (out: never read)
        if self.input_dtype is not None and x.dtype != self.input_dtype:
            x = x.view(self.input_dtype)
        self.launch(x, *(before or self.before), out if bias is None else bias, out, workspace, counters, *self.after)
        return out

    def launch_with(self, x: torch.Tensor, bias: torch.Tensor | None, weight: tuple[int, ...]) -> torch.Tensor:
        """Launch directly (only when ``launch.direct()``) with ``weight``, the pointers of the
        weight's tensors (``pointers``) in the order ``bind`` gives them."""
        # the size by keyword: torch's argument parser takes a positional tuple 0.5-1.7 us slower
        out = torch.empty(size=self.out_shape, dtype=self.dtype, device=self.device)
        if self.prepare_input is not None:
            x = self.prepare_input(x)
        workspace, counters = self._split_buffers() if self.tiles else (out, out)  # (out: never read)
        output = out.data_ptr()
        self.launch.run(
            x.data_ptr(), *weight, output if bias is None else bias.data_ptr(), output,
            workspace.data_ptr(), counters.data_ptr(), *self.after,
        )  # fmt: skip
        return out

    def _split_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The zeroed workspace and counters, kept for the last stream this launch ran on."""
        cuda = self.device.type == "cuda"
        stream = torch._C._cuda_getCurrentRawStream(self.device.index) if cuda else 0
        kept = not (cuda and torch._C._cuda_isCurrentStreamCapturing())
        cached = self._workspace
        if kept and cached is not None and cached[0] == stream:
            return cached[1], cached[2]
        workspace, counters = split_buffers(self.device, self.rows * self.columns, self.tiles)
        if kept:
            self._workspace = (stream, workspace, counters)
        return workspace, counters


def _hooked() -> bool:
    """Whether something (a profiler) listens to Triton's launches: then they go through the JIT,
    which calls the hooks. Triton 3.5 and newer keep the hooks in (possibly empty) chains."""
    hooks = triton.compiler.CompiledKernel if knobs is None else knobs.runtime
    return _listening(hooks.launch_enter_hook) or _listening(hooks.launch_exit_hook)


def _listening(hook: object) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))
