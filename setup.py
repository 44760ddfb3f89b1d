"""Build dspark_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a
CUDA build of torch are present.

Environment:
  DSPARK_SKIP_CUDA_BUILD=1   build the CPU kernels only
  DSPARK_REQUIRE_CUDA_BUILD=1  fail instead of building CPU-only when no toolkit is found (CI)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "9.0a": H100/H200, wgmma)
  CUDA_HOME                   toolkit root (else the real path behind nvcc, else /usr/local/cuda)
  MAX_JOBS                    parallel compile jobs (default: from free memory, at most the cores)
  DSPARK_SANITIZE=1           CPU kernels with ASan + UBSan, -O1, -fno-wrapv (.ci/sanitizers.sh; CPU only)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
        os.path.join(root, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit behind `nvcc` on PATH, else /usr/local/cuda.

    `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc) rather than a
    link into the toolkit, so every candidate must hold include/cuda_runtime.h."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit(home):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def _nvidia_wheel_includes() -> list[str]:
    """Headers torch's CUDA headers pull in (cusparse.h, ...) live in the nvidia wheels."""
    out = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                out.append(path)
    return out


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (sdist, egg_info without torch)
        return [], {}

    cuda_home = None if os.environ.get("DSPARK_SKIP_CUDA_BUILD") == "1" else _find_cuda_home()
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if os.environ.get("DSPARK_REQUIRE_CUDA_BUILD") == "1" and not with_cuda:
        raise RuntimeError("DSPARK_REQUIRE_CUDA_BUILD=1 but no CUDA toolkit (nvcc) or no CUDA build of torch "
                           f"was found (CUDA_HOME={cuda_home}, torch.version.cuda={torch.version.cuda})")
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
            print("dspark_kernels: TORCH_CUDA_ARCH_LIST unset, building for 9.0a (H100/H200)")
    if not os.environ.get("MAX_JOBS"):
        try:
            free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        except (ValueError, OSError):
            free_gb = 8
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 4))))

    sources = ["csrc/ops.cpp", "csrc/launch_plan.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if os.environ.get("DSPARK_SANITIZE") == "1":
        if with_cuda:
            raise RuntimeError("DSPARK_SANITIZE=1 builds the CPU kernels only: set DSPARK_SKIP_CUDA_BUILD=1")
        # After Python's own flags, so -fno-wrapv undoes its -fwrapv (which hides signed overflow from UBSan).
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx_flags = ["-O1", "-g", "-fopenmp", "-fno-wrapv", "-fno-omit-frame-pointer"] + sanitize
        link_flags = ["-fopenmp"] + sanitize
    define_macros = []  # py_limited_api=True makes torch define Py_LIMITED_API itself
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _nvidia_wheel_includes()
        cxx_flags.append("-DDSPARK_WITH_CUDA")
        nvcc_flags = ["-O3", "-DDSPARK_WITH_CUDA", "--expt-relaxed-constexpr",
                      "-lineinfo", "-Xptxas=-v" if os.environ.get("DSPARK_PTXAS_VERBOSE") else "-w"]
        ext = cpp_extension.CUDAExtension(
            "dspark_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, py_limited_api=True,
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dspark_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, py_limited_api=True, extra_link_args=link_flags,
        )
    print(f"dspark_kernels: building CPU{' + CUDA (' + cuda_home + ')' if with_cuda else ''} kernels")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class BuildPyWithDeviceSources(build_py):
    """Ships csrc/include/dspark/*.h, *.cuh as dspark_kernels/nvrtc/include/dspark: the
    sources the NVRTC backend compiles at run time (an editable install reads
    csrc/include directly)."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "dspark_kernels", "nvrtc", "include", "dspark")
        os.makedirs(dst, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "dspark", "*"))):
            if path.endswith((".h", ".cuh")):
                shutil.copy2(path, dst)


ext_modules, cmdclass = _extensions()
cmdclass = dict(cmdclass, build_py=BuildPyWithDeviceSources)

setup(
    packages=find_packages(include=["dspark_kernels", "dspark_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
