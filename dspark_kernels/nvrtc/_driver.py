"""Loading NVRTC cubins and launching their kernels (``cuda.bindings.driver``).

One module per (program, device), loaded into the device's primary context (the
one torch uses) on first use; kernels are launched with ``cuLaunchKernel`` on
``torch.cuda.current_stream()``, arguments by address (a ctypes structure for the
kernels that take one parameter block, ctypes scalars / pointers otherwise). No
call here synchronises the host, so a launch can be captured in a CUDA graph; a
program is compiled and loaded on its first call, which should therefore come
before a capture (a warm-up call, as with Triton).
"""

from __future__ import annotations

import ctypes
import threading

import torch

from . import _compiler

_lock = threading.Lock()
_functions: dict[tuple[str, int], dict[str, object]] = {}
_smem_allowed: dict[tuple[int, str], int] = {}


class CudaDriverError(RuntimeError):
    pass


def _driver():
    from cuda.bindings import driver
    return driver


def _ck(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        drv = _driver()
        name = drv.cuGetErrorName(err)[1]
        raise CudaDriverError(f"dspark_kernels.nvrtc: {what} failed: {name.decode() if name else err!r}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_arch(device_index: int) -> str:
    """``sm_XY`` of the device, or the newest architecture NVRTC knows with the same
    major and a smaller minor (a cubin runs on later minors of its major)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    supported = set(_compiler.supported_archs())
    for m in range(minor, -1, -1):
        if f"sm_{major}{m}" in supported:
            return f"sm_{major}{m}"
    raise _compiler.NvrtcError(f"NVRTC {'%d.%d' % _compiler.nvrtc_version()} cannot compile for compute "
                               f"capability {major}.{minor} (supports {sorted(supported)}); install a newer "
                               "nvidia-cuda-nvrtc")


def functions(program: _compiler.Program, device_index: int) -> dict[str, object]:
    """``{C++ kernel name: CUfunction}`` of ``program`` on the device (compiled / loaded once)."""
    key = (program.name, device_index)
    fns = _functions.get(key)
    if fns is not None:
        return fns
    with _lock:
        fns = _functions.get(key)
        if fns is None:
            compiled = _compiler.compile_program(program, device_arch(device_index))
            drv = _driver()
            with torch.cuda.device(device_index):
                torch.cuda.init()
                torch.cuda.current_stream(device_index)  # the runtime makes the primary context current
                module = _ck(drv.cuModuleLoadData(compiled.cubin), f"cuModuleLoadData({program.name})")
                fns = {name: _ck(drv.cuModuleGetFunction(module, sym.encode()), f"cuModuleGetFunction({name})")
                       for name, sym in compiled.lowered.items()}
            _functions[key] = fns
    return fns


def allow_dynamic_smem(fn, kernel: str, device_index: int, nbytes: int) -> None:
    """Raise the kernel's dynamic shared-memory limit to ``nbytes`` (once per size)."""
    key = (device_index, kernel)
    if _smem_allowed.get(key, 0) >= nbytes:
        return
    drv = _driver()
    attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    with torch.cuda.device(device_index):
        _ck(drv.cuFuncSetAttribute(fn, attr, int(nbytes)), f"cuFuncSetAttribute({kernel})")
    _smem_allowed[key] = nbytes


def launch(fn, grid, block: int, smem: int, args: list, device_index: int) -> None:
    """``fn<<<grid, block, smem, current stream>>>(*args)``; ``args`` are ctypes objects."""
    gx, gy, gz = (tuple(grid) + (1, 1))[:3] if isinstance(grid, (tuple, list)) else (grid, 1, 1)
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    drv = _driver()
    stream = drv.CUstream(torch.cuda.current_stream(device_index).cuda_stream)
    _ck(drv.cuLaunchKernel(fn, int(gx), int(gy), int(gz), int(block), 1, 1, int(smem), stream,
                           ctypes.addressof(ptrs), 0), "cuLaunchKernel")
