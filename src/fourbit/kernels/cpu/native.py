"""The native CPU kernels: ``fourbit_cpu.cpp`` (with the kernel headers beside it) compiled on
first use, cached on disk, called through ctypes.

The source is plain C++ with a C interface and no torch headers, so it compiles in seconds with
the system's C++ compiler (``$CXX``, else ``c++``) and does not depend on torch's C++ ABI. The
library is cached under ``$FOURBIT_CACHE_DIR`` (default ``~/.cache/fourbit``), named by a hash of
the source, the flags and the compiler, and written atomically, so a second process, or one
running beside the first, loads it without compiling. When compiling fails, one warning is
issued and the caller falls back to the compiled or reference path; ``FOURBIT_CPU_NATIVE=0``
skips the attempt. ``FOURBIT_CPU_ISA`` (``avx512_bf16``, ``avx512``, ``avx2`` or ``portable``) caps
the variant.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import warnings
from math import prod
from pathlib import Path

import torch

__all__ = [
    "AMX",
    "AVX512",
    "AVX512_BF16",
    "F32_BF16",
    "ISA_NAMES",
    "MAX_RUN",
    "Weight",
    "available",
    "build_info",
    "dtype_code",
    "empty",
    "isa",
    "library",
    "refresh_isa",
]

SOURCE = Path(__file__).with_name("fourbit_cpu.cpp")
#: The headers it includes (the kernels), hashed with it into the cached library's name.
HEADERS = ("common.h", "dequantize.h", "product.h", "product_avx2.h", "quantize.h", "amx.h")
#: No fused multiply-add contraction: scales must round exactly as the reference's.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
OPENMP = ("-fopenmp",)
NO_AMX = ("-DFOURBIT_NO_AMX",)
ISA_NAMES = ("portable", "avx2", "avx512", "avx512_bf16", "amx")
#: The variants by their index in ISA_NAMES (the native library's numbering); AMX: tiles that
#: multiply bfloat16 products of several rows.
AVX2 = ISA_NAMES.index("avx2")
AVX512 = ISA_NAMES.index("avx512")
AVX512_BF16 = ISA_NAMES.index("avx512_bf16")
AMX = ISA_NAMES.index("amx")
#: Blocks of one weight row the product kernels take (``MAX_RUN`` in the source).
MAX_RUN = 512
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: The product's code for float32 rows that may be multiplied in bfloat16 (torch's "medium"
#: float32 matmul precision): one bfloat16 product each on AVX512-BF16, three on AMX tiles.
F32_BF16 = 3


class Weight(ctypes.Structure):
    """The C ``Weight``: one packed weight's pointers (see ``common.h``)."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("qabsmax", ctypes.c_void_p),
        ("nested_code", ctypes.c_void_p),
        ("nested_absmax", ctypes.c_void_p),
        ("offset", ctypes.c_void_p),
        ("nested_blocksize", ctypes.c_int64),
        ("blocksize", ctypes.c_int64),
    ]


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed = False
_info: dict[str, object] = {}


#: Outputs from this size on are advised onto transparent huge pages (``empty``).
HUGE_PAGE_MIN_BYTES = 4 << 20
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # Linux


def _libc_madvise() -> object | None:
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


_madvise = _libc_madvise()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for a kernel's output. A large one is advised onto transparent huge pages
    first: writing a fresh 32 MB output otherwise spends most of its time faulting in 4 KB pages
    (measured 7.7 ms against 1.6 ms to fill). Only a hint: nothing changes where the kernel
    refuses it or the system has no huge pages."""
    out = torch.empty(shape, dtype=dtype)
    size = prod(shape) * dtype.itemsize  # no tensor method: right after a kernel each costs microseconds
    if _madvise is not None and size >= HUGE_PAGE_MIN_BYTES:
        address = out.data_ptr()
        start = (address + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        stop = (address + size) & ~(_HUGE_PAGE - 1)
        if stop > start:
            _madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), ctypes.c_int(_MADV_HUGEPAGE))
    return out


def enabled() -> bool:
    """Whether the native kernels may be used (``FOURBIT_CPU_NATIVE`` unset or 1, no failed build)."""
    return not _failed and os.environ.get("FOURBIT_CPU_NATIVE", "1") not in ("0", "")


def available() -> bool:
    """Whether the native library is enabled and loaded (building it on first use)."""
    return enabled() and library() is not None


def dtype_code(dtype: torch.dtype) -> int | None:
    """The kernels' code for ``dtype`` (float32, bfloat16, float16), or None when unsupported."""
    return _DTYPES.get(dtype)


_isa: int | None = None


def isa() -> int:
    """The variant to run: the best this CPU supports, capped by ``FOURBIT_CPU_ISA`` (read at
    first use and by ``refresh_isa``)."""
    return _isa if _isa is not None else refresh_isa()


def refresh_isa() -> int:
    """Read ``FOURBIT_CPU_ISA`` again (tests force each variant this way)."""
    global _isa
    library()
    best = int(_info.get("isa", 0))
    cap = os.environ.get("FOURBIT_CPU_ISA", "")
    if cap and cap not in ISA_NAMES:
        raise ValueError(f"FOURBIT_CPU_ISA must be one of {', '.join(ISA_NAMES)}, got {cap!r}")
    _isa = min(best, ISA_NAMES.index(cap)) if cap else best
    return _isa


def build_info() -> dict[str, object]:
    """How the library was obtained: ``path``, ``compiled`` (in this process), ``seconds`` (the
    compile), ``isa`` (the best variant of this CPU), ``openmp``; empty before first use."""
    return dict(_info)


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$FOURBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fourbit``
    or ``~/.cache/fourbit``; when that cannot be written, ``<tempdir>/fourbit-<uid>``."""
    root = os.environ.get("FOURBIT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fourbit"


def library() -> ctypes.CDLL | None:
    """The loaded library, compiling it on first use; None (after one warning) when that fails."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    with _lock:
        if _library is None and not _failed:
            try:
                _library = _load()
            except Exception as error:  # no compiler, a failed compile, an unloadable library
                _failed = True
                warnings.warn(
                    f"fourbit: the native CPU kernels could not be built ({type(error).__name__}: {error}); "
                    "using the slower compiled or reference path (set FOURBIT_CPU_NATIVE=0 to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _library


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return compiler


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    source = b"\0".join(path.read_bytes() for path in (SOURCE, *(SOURCE.with_name(name) for name in HEADERS)))
    # a compiler without OpenMP still gives single-threaded kernels; an assembler that does not know
    # AMX's instructions, the kernels without them
    variants = [(*openmp, *amx) for openmp in (OPENMP, ()) for amx in ((), NO_AMX)]
    folder, writable = cache_dir(), None  # a cached library is loaded from wherever it is
    for index, extra in enumerate(variants):
        flags = (*FLAGS, *extra)
        digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                             platform.machine().encode()])).hexdigest()[:16]  # fmt: skip
        path = folder / f"fourbit_cpu-{digest}.so"
        compiled, seconds = False, 0.0
        lib = _open(path)
        if lib is None:
            writable = writable or _writable_folder(folder)
            path = writable / path.name
            lib = _open(path)
        if lib is None:
            start = time.perf_counter()
            error = _compile(compiler, flags, path)
            if error is not None:
                if index + 1 < len(variants):
                    continue
                raise RuntimeError(error)
            compiled, seconds = True, time.perf_counter() - start
            lib = ctypes.CDLL(str(path))
        _declare(lib)
        _info.update(path=str(path), compiled=compiled, seconds=seconds, isa=lib.fourbit_cpu_isa(),
                     openmp=OPENMP[0] in extra)  # fmt: skip
        return lib
    raise AssertionError("unreachable")


def _open(path: Path) -> ctypes.CDLL | None:
    """The cached library at ``path``; None when there is none, or when it is damaged (cut short,
    or refused by the loader), so that it is built again."""
    if not path.exists() or not _whole(path):
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _whole(path: Path) -> bool:
    """Whether an ELF library holds everything its header promises. The loader maps a file cut
    short as if whole, and the process dies of SIGBUS where it reads past the end, so that is
    checked first (the section headers come last); other formats are left to the loader."""
    with open(path, "rb") as file:
        header = file.read(64)
    if header[:4] != b"\x7fELF":
        return True
    if len(header) < 52:
        return False
    # e_shoff, then e_shentsize and e_shnum: at 40 and 58 in a 64-bit header, 32 and 46 in a 32-bit one
    order, wide = "<" if header[5] == 1 else ">", header[4] == 2
    (offset,) = struct.unpack_from(order + ("Q" if wide else "I"), header, 40 if wide else 32)
    size, count = struct.unpack_from(order + "HH", header, 58 if wide else 46)
    return offset + size * count <= path.stat().st_size


def _writable_folder(folder: Path) -> Path:
    """``folder`` when it can be created and written; else a folder of this user's in the system's
    temporary directory (as inductor falls back to), with one warning naming both. A read-only
    home directory (containers, cluster nodes) then still gets the native kernels."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
        problem = "not writable"
    except OSError as error:
        problem = f"{type(error).__name__}: {error}"
    fallback = Path(tempfile.gettempdir()) / f"fourbit-{_user_tag()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if hasattr(os, "getuid"):  # a shared temporary directory: load only from a folder no one else can write
        status = fallback.stat()
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            raise PermissionError(f"{fallback} is writable by other users; cannot keep compiled kernels there")
    warnings.warn(
        f"fourbit: cannot keep compiled CPU kernels in {folder} ({problem}); using {fallback} "
        "(set FOURBIT_CACHE_DIR to choose)",
        RuntimeWarning,
        stacklevel=5,
    )
    return fallback


def _user_tag() -> str:
    """This user's id for a folder name: the uid where there is one, else the login name."""
    if hasattr(os, "getuid"):
        return str(os.getuid())
    import getpass

    return getpass.getuser()


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> str | None:
    """Compile the source to ``path`` (written atomically); the compiler's complaint, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(descriptor)
    try:
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", temporary], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            return f"{Path(compiler).name} exited with {result.returncode}: {result.stderr.strip()[-400:]}"
        os.replace(temporary, path)
        return None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _declare(lib: ctypes.CDLL) -> None:
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.fourbit_cpu_isa.argtypes, lib.fourbit_cpu_isa.restype = [], i32
    lib.fourbit_dequantize.argtypes = [ctypes.POINTER(Weight), i64, pointer, i32, i32, i32]
    lib.fourbit_dequantize.restype = None
    lib.fourbit_dequantize_range.argtypes = [ctypes.POINTER(Weight), i64, i64, pointer, i32, i32, i32]
    lib.fourbit_dequantize_range.restype = None
    lib.fourbit_dequantize_range_widened.argtypes = [ctypes.POINTER(Weight), i64, i64, pointer, i32, i32, i32]
    lib.fourbit_dequantize_range_widened.restype = None
    lib.fourbit_linear.argtypes = [ctypes.POINTER(Weight), i64, i64, pointer, i64, pointer, pointer, i32, i32, i32]
    lib.fourbit_linear.restype = None
    lib.fourbit_quantize.argtypes = [pointer, i32, i64, i64, pointer, pointer, pointer, pointer, i32, i32]
    lib.fourbit_quantize.restype = None
