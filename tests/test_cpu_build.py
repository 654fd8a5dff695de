"""Building the native CPU kernels (fourbit.kernels.cpu.native): compiled once and cached across
processes (and built again when the cached file is damaged), one warning and the fallback when
nothing compiles, a private temporary folder when the
cache folder cannot be written, a toolchain without AMX, the switches that turn them off or pick a
variant, and what the build hash covers."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fourbit.functional as F4
from fourbit.kernels import cpu, reference
from fourbit.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no working C++ compiler here")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


_REPORT = (
    "import warnings, torch, fourbit.functional as F4\n"
    "from fourbit.kernels.cpu import native\n"
    "warnings.simplefilter('always')\n"
    "p, s = F4.quantize_4bit(torch.randn(64, 64))\n"
    "w = F4.dequantize_4bit(p, s)\n"
    "print(native.available(), native.build_info().get('compiled'))\n"
)


def test_a_second_process_compiles_nothing(tmp_path):
    first = _python(_REPORT, FOURBIT_CACHE_DIR=str(tmp_path))
    second = _python(_REPORT, FOURBIT_CACHE_DIR=str(tmp_path))
    assert first.stdout.split() == ["True", "True"], first.stderr
    assert second.stdout.split() == ["True", "False"], second.stderr
    assert len(list(tmp_path.glob("fourbit_cpu-*.so"))) == 1


def test_a_failing_compiler_warns_once_and_falls_back(tmp_path):
    result = _python(_REPORT + "w2 = F4.dequantize_4bit(p, s)\nprint(torch.equal(w, w2))\n",
                     FOURBIT_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++")  # fmt: skip
    assert result.stdout.split() == ["False", "None", "True"], result.stderr
    assert result.stderr.count("native CPU kernels could not be built") == 1
    assert not list(tmp_path.glob("*.so"))


def test_a_damaged_cached_library_is_built_again(tmp_path):
    first = _python(_REPORT, FOURBIT_CACHE_DIR=str(tmp_path))
    assert first.stdout.split() == ["True", "True"], first.stderr
    (library,) = tmp_path.glob("fourbit_cpu-*.so")
    library.write_bytes(library.read_bytes()[:4096])  # truncated, as a full disk might leave it
    second = _python(_REPORT, FOURBIT_CACHE_DIR=str(tmp_path))
    assert second.stdout.split() == ["True", "True"], second.stderr  # compiled again, and used
    third = _python(_REPORT, FOURBIT_CACHE_DIR=str(tmp_path))
    assert third.stdout.split() == ["True", "False"], third.stderr


def test_an_unwritable_cache_folder_builds_in_a_private_temporary_folder(tmp_path):
    """A read-only home still gets the native kernels: the build goes to <tempdir>/fourbit-<uid>."""
    blocker = tmp_path / "file"
    blocker.write_text("")  # FOURBIT_CACHE_DIR below a file cannot be created
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    report = _REPORT + "print(native.build_info()['path'])\n"
    result = _python(report, FOURBIT_CACHE_DIR=str(blocker / "cache"), TMPDIR=str(temporary))
    available, compiled, path = result.stdout.split()
    assert (available, compiled) == ("True", "True"), result.stderr
    fallback = temporary / f"fourbit-{os.getuid()}"
    assert os.path.dirname(path) == str(fallback)
    assert fallback.stat().st_mode & 0o077 == 0  # private to the user
    assert result.stderr.count("cannot keep compiled CPU kernels in") == 1
    assert "could not be built" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_temporary_folder_others_can_write_is_refused(tmp_path):
    """In a shared temporary directory, a library from a folder anyone can write could be anyone's."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    temporary = tmp_path / "tmp"
    (temporary / f"fourbit-{os.getuid()}").mkdir(parents=True)
    (temporary / f"fourbit-{os.getuid()}").chmod(0o777)
    result = _python(_REPORT, FOURBIT_CACHE_DIR=str(blocker / "cache"), TMPDIR=str(temporary))
    assert result.stdout.split() == ["False", "None"], result.stderr
    assert "writable by other users" in result.stderr
    assert not list(temporary.rglob("*.so"))


def test_a_toolchain_without_amx_builds_the_other_variants(tmp_path):
    """A compiler (or assembler) that rejects the AMX kernel still gives the vector variants."""
    compiler = tmp_path / "c++"
    real = native._compiler()  # the compiler the library would use
    compiler.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-DFOURBIT_NO_AMX*) ;; *) echo "bad register name %tmm0" >&2; exit 1 ;; esac\n'
        f'exec {real} "$@"\n'
    )
    compiler.chmod(0o755)
    report = _REPORT + "print(native.isa() < native.AMX, native.build_info()['openmp'])\n"
    result = _python(report, FOURBIT_CACHE_DIR=str(tmp_path / "cache"), CXX=str(compiler))
    assert result.stdout.split() == ["True", "True", "True", "True"], result.stderr
    assert "could not be built" not in result.stderr


def test_the_native_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_NATIVE", "0")
    assert not native.available() and cpu.prepare(torch.zeros(1, 1, dtype=torch.uint8)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed, state = F4.quantize_4bit(torch.randn(16, 64), blocksize=64, quant_type="nf4")
        arguments = {"absmax": state.absmax, "code": state.code}
        out = cpu.dequantize_4bit(packed, blocksize=64, shape=(16, 64), dtype=torch.float32, **arguments)
    expected = reference.dequantize_4bit(packed, blocksize=64, shape=(16, 64), dtype=torch.float32, **arguments)
    assert torch.equal(out, expected)


def test_an_unknown_variant_name_is_rejected(monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="FOURBIT_CPU_ISA"):
        native.refresh_isa()
    monkeypatch.undo()
    native.refresh_isa()


def test_large_outputs_are_allocated_as_usual_tensors():
    """``native.empty`` only advises the kernel about huge pages: the tensor is an ordinary one."""
    for shape, dtype in [((3, 5), torch.float32), ((4096, 1024), torch.bfloat16), ((1 << 23,), torch.uint8)]:
        out = native.empty(shape, dtype)
        assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
        out.fill_(1)
        assert int(out.sum()) == out.numel()


def test_every_kernel_header_is_part_of_the_build_hash():
    """A header left out of ``native.HEADERS`` would let an edited kernel load a stale library."""
    assert sorted(native.HEADERS) == sorted(path.name for path in native.SOURCE.parent.glob("*.h"))
