"""NVRTC: device source -> cubin for one exact architecture, with a disk cache.

The binding is ``cuda-bindings`` (``cuda.bindings.nvrtc``; docs/building.md says
why). ``compile_program`` needs no GPU: ``--gpu-architecture=sm_XY`` makes NVRTC
run ptxas itself and return a cubin (never PTX, which a driver older than the
toolkit rejects), and ``--ptxas-options=-v`` puts each kernel's registers, spills
and shared memory in the program log (:func:`resource_usage` parses them).

Cache: ``$DSPARK_CACHE/nvrtc`` (default ``~/.cache/dspark_kernels/nvrtc``), one file
per program, named by the sha256 of (headers, program source, name expressions,
options, architecture, NVRTC version, dspark_kernels version). A file holds a
magic line, its own key, the payload's sha256 and the payload (the cubin and the
lowered kernel names); anything else is corrupt or stale and is rebuilt, never
loaded. Written to a temporary file in the same directory, then ``os.replace``d:
two processes compiling the same program both succeed, and a reader never sees a
half-written file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
import time

from . import _source

MAGIC = b"dspark-nvrtc-cache 1\n"
BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-lineinfo")


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a program does not compile (the message holds the log)."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # cuda-bindings missing, or no libnvrtc behind it
        raise NvrtcError(f"cuda-bindings is not importable ({exc}); pip install 'dspark_kernels[nvrtc]'") from exc
    return nvrtc


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise NvrtcError(f"NVRTC {what} failed: {err!r}")
    return rest[0] if len(rest) == 1 else tuple(rest)


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the libnvrtc that cuda-bindings loads; raises NvrtcError if none."""
    try:
        major, minor = _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, NvrtcError):
            raise
        raise NvrtcError(f"libnvrtc could not be loaded ({exc}); pip install nvidia-cuda-nvrtc") from exc
    return int(major), int(minor)


def supported_archs() -> list[str]:
    """The ``sm_XY`` NVRTC can emit a cubin for."""
    nvrtc = _nvrtc()
    n = _check(nvrtc.nvrtcGetNumSupportedArchs(), "nvrtcGetNumSupportedArchs")
    archs = _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    return [f"sm_{a}" for a in list(archs)[:n]]


def library_version() -> str:
    from .. import __version__
    return __version__


@dataclasses.dataclass(frozen=True)
class Program:
    """One NVRTC translation unit: ``source`` (includes of ``dspark/*.cuh``) and the
    kernels to export, as C++ names (``"dspark::vb::stats_kernel<dspark::vb::F32, ...>"``)."""

    name: str
    source: str
    kernels: tuple[str, ...]


@dataclasses.dataclass
class Compiled:
    program: str
    arch: str
    cubin: bytes
    lowered: dict[str, str]  # C++ name -> mangled symbol in the cubin
    log: str
    seconds: float
    from_cache: bool


def options(arch: str) -> list[str]:
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"nvrtc: arch must look like sm_90 / sm_90a / sm_100a, got {arch!r}")
    return [f"--gpu-architecture={arch}", *BASE_OPTIONS, f"-I{_source.include_dir()}"]


def cache_dir() -> str:
    root = os.environ.get("DSPARK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dspark_kernels")
    return os.path.join(root, "nvrtc")


def cache_key(program: Program, arch: str) -> str:
    """sha256 of everything the cubin depends on."""
    h = hashlib.sha256()
    for part in (_source.sources_digest(), program.source, "\n".join(program.kernels), " ".join(options(arch)),
                 arch, "%d.%d" % nvrtc_version(), library_version()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _read_cache(path: str, key: str) -> tuple[bytes, dict] | None:
    """The entry at ``path`` if it is whole and belongs to ``key``, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    header = MAGIC + key.encode() + b"\n"
    if not data.startswith(header) or len(data) < len(header) + 65:
        return None
    digest, payload = data[len(header):len(header) + 64], data[len(header) + 65:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    try:
        meta_len = int.from_bytes(payload[:8], "little")
        meta = json.loads(payload[8:8 + meta_len])
        cubin = payload[8 + meta_len:]
    except (ValueError, UnicodeDecodeError):
        return None
    if len(cubin) != meta.get("cubin_bytes") or not cubin.startswith(b"\x7fELF"):
        return None
    return cubin, meta


def _write_cache(path: str, key: str, cubin: bytes, meta: dict) -> None:
    """Atomic: a temporary file in the cache directory, then os.replace (best effort:
    an unwritable cache only costs a recompile)."""
    meta = dict(meta, cubin_bytes=len(cubin))
    blob = json.dumps(meta, sort_keys=True).encode()
    payload = len(blob).to_bytes(8, "little") + blob + cubin
    data = MAGIC + key.encode() + b"\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".cubin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass


def _compile_uncached(program: Program, arch: str) -> tuple[bytes, dict[str, str], str]:
    nvrtc = _nvrtc()
    nvrtc_version()
    prog = _check(nvrtc.nvrtcCreateProgram(program.source.encode(), f"{program.name}.cu".encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        for k in program.kernels:
            _check(nvrtc.nvrtcAddNameExpression(prog, f"&{k}".encode()), f"nvrtcAddNameExpression({k})")
        opts = [o.encode() for o in options(arch)]
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if int(result[0]) != 0:
            raise NvrtcError(f"NVRTC could not compile {program.name} for {arch} ({result[0]!r}):\n{log}")
        lowered = {}
        for k in program.kernels:
            name = _check(nvrtc.nvrtcGetLoweredName(prog, f"&{k}".encode()), f"nvrtcGetLoweredName({k})")
            lowered[k] = name.decode()
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin, lowered, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_program(program: Program, arch: str, use_cache: bool = True) -> Compiled:
    """The cubin of ``program`` for ``arch``: from the cache when a valid entry exists,
    else compiled (and cached)."""
    key = cache_key(program, arch)
    path = os.path.join(cache_dir(), f"{program.name}-{arch}-{key[:32]}.cubin")
    start = time.perf_counter()
    if use_cache:
        hit = _read_cache(path, key)
        if hit is not None:
            cubin, meta = hit
            return Compiled(program.name, arch, cubin, meta["lowered"], meta["log"], time.perf_counter() - start,
                            True)
    cubin, lowered, log = _compile_uncached(program, arch)
    if use_cache:
        _write_cache(path, key, cubin, {"program": program.name, "arch": arch, "lowered": lowered, "log": log})
    return Compiled(program.name, arch, cubin, lowered, log, time.perf_counter() - start, False)


# ---------------------------------------------------------------------- resource usage

@dataclasses.dataclass
class Usage:
    kernel: str  # mangled
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    cmem0: int = 0


def resource_usage(log: str) -> list[Usage]:
    """Per-kernel figures of ptxas's verbose report in an NVRTC log."""
    out: list[Usage] = []
    cur: Usage | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = Usage(m.group(1))
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(sm.group(1)) if sm else 0
            cm = re.search(r"(\d+) bytes cmem\[0\]", line)
            cur.cmem0 = int(cm.group(1)) if cm else 0
    return out
