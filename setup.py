"""Build persimmon_rt: the CUDA extension persimmon_rt._C when torch has CUDA and nvcc is found,
otherwise the pure-Python package (every op then runs on its PyTorch reference).

Always install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.

Environment switches:
  PERSIMMON_RT_CUDA_ARCH   semicolon-separated compute capabilities to build for (default "90a")
  PERSIMMON_RT_NO_CUDA=1   skip the extension even where it could be built
  PERSIMMON_RT_DEBUG=1     -O0 -g -lineinfo (host and device)
  MAX_JOBS                 parallel compile jobs (torch's ninja builder reads it)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    if os.environ.get("PERSIMMON_RT_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return [], {}
    debug = os.environ.get("PERSIMMON_RT_DEBUG") == "1"
    archs = os.environ.get("PERSIMMON_RT_CUDA_ARCH", "90a").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "torch_bindings.cpp")]
    ext = CUDAExtension(
        name="persimmon_rt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # No -std: torch picks the C++ standard its headers need (C++20 from 2.10). torch shell-quotes each
            # flag, so the double quotes reach the compiler and the macro is a string literal.
            "cxx": opt + [f'-DPERSIMMON_RT_CUDA_ARCHS="{",".join(a for a in archs if a)}"'],
            "nvcc": opt + gencode + ["-std=c++17", "-lineinfo", "--use_fast_math", "--expt-relaxed-constexpr",
                                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
                    + (["-G"] if debug else []),
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=find_packages(include=["persimmon_rt", "persimmon_rt.*"]),
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
