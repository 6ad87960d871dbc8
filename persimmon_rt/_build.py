"""Building the CUDA extension persimmon_rt._C, at install (setup.py) or on first use (ops.py).

setup.py loads this file by path, so it imports nothing from the package and torch only inside functions.

The compiler matters: one that links libstdc++ statically into the extension gives it a C++ runtime of its
own, and then the error an op raises (a TORCH_CHECK on a bad shape, say) cannot cross into torch's runtime
and aborts the process instead of becoming a Python RuntimeError. `pick_cxx` therefore builds a small probe
library with each candidate and takes the first that links libstdc++ dynamically.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout: csrc/ lies here
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "90a"
FALLBACK_CXX = ("c++", "g++", "/usr/bin/c++", "/usr/bin/g++")
INSTALL = "pip install --no-build-isolation -e ."

_PROBE = r"""
#include <stdexcept>
#include <string>
extern "C" int persimmon_rt_probe(int n) {
  try { if (n > 0) throw std::runtime_error(std::string(n, 'x')); }
  catch (const std::exception& e) { return static_cast<int>(std::string(e.what()).size()); }
  return 0;
}
"""


# ------------------------------------------------------------------------------------------- the compiler
def needed_libraries(path: str) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object (what `readelf -d` lists)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 6:                                           # SHT_DYNAMIC
            continue
        strings = sections[link][4]
        for j in range(size // 16):
            tag, value = struct.unpack_from("<qQ", data, offset + 16 * j)
            if tag == 0:                                        # DT_NULL
                break
            if tag == 1:                                        # DT_NEEDED
                end = data.index(b"\0", strings + value)
                names.append(data[strings + value:end].decode())
    return names


def links_libstdcxx_dynamically(cxx: str) -> bool:
    """Whether `cxx` builds a shared library that loads libstdc++.so (False also when it cannot build one)."""
    with tempfile.TemporaryDirectory(prefix="persimmon_rt_probe_") as tmp:
        source, library = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(source, "w") as fh:
            fh.write(_PROBE)
        try:
            subprocess.run([cxx, "-shared", "-fPIC", "-O0", source, "-o", library], check=True, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return any(name.startswith("libstdc++.so") for name in needed_libraries(library))
        except (OSError, subprocess.SubprocessError, ValueError):
            return False


def pick_cxx(env=os.environ, which=shutil.which, works=links_libstdcxx_dynamically) -> str:
    """The C++ compiler to build the extension with: $CXX when it links libstdc++ dynamically, else the first
    of FALLBACK_CXX that does. Raises RuntimeError (one line) when none does."""
    wanted = env.get("CXX") or None
    tried, seen = [], set()
    for name in ([wanted] if wanted else []) + list(FALLBACK_CXX):
        path = which(name)
        if path is None or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if works(path):
            if wanted and name != wanted:
                print(f"persimmon_rt: CXX={wanted} links libstdc++ statically (an op's error would abort the "
                      f"process instead of raising); building with {path}", file=sys.stderr)
            return path
        tried.append(name)
    raise RuntimeError(f"no C++ compiler that links libstdc++ dynamically (tried {', '.join(tried) or 'none found'}"
                       "); install g++ or set CXX to one, or set PERSIMMON_RT_NO_CUDA=1 to go without the CUDA "
                       "extension")


# -------------------------------------------------------------------------------------------- the build
def sources(root: str = ROOT) -> list[str]:
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "*.cu"))) + [os.path.join(csrc, "torch_bindings.cpp")]


def cuda_archs(env=os.environ, default: str = DEFAULT_ARCHS) -> list[str]:
    """PERSIMMON_RT_CUDA_ARCH ("80;90a", commas also accepted), else `default`."""
    return [a for a in env.get("PERSIMMON_RT_CUDA_ARCH", default).replace(",", ";").split(";") if a.strip()]


def compile_flags(archs: list[str], debug: bool, shell_quote: bool) -> dict[str, list[str]]:
    """Host and device flags. `shell_quote`: whether the flags reach the shell unquoted (torch's JIT loader);
    its setuptools builder quotes them itself. The architecture list becomes a string literal macro, for the
    extension's CUDA_ARCHS and for the launchers' choice of kernels."""
    opt = ["-O0", "-g"] if debug else ["-O3"]
    macro = f'-DPERSIMMON_RT_CUDA_ARCHS="{",".join(archs)}"'
    macro = shlex.quote(macro) if shell_quote else macro
    return {
        # No -std for the host: torch picks the C++ standard its headers need (C++20 from 2.10).
        "cxx": opt + [macro],
        # The launchers read the list too: sm_90a kernels run only where the build has them.
        "nvcc": opt + [macro] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        + ["-std=c++17", "-lineinfo", "--use_fast_math", "--expt-relaxed-constexpr",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"] + (["-G"] if debug else []),
    }


def find_nvcc(cuda_home: str | None) -> str | None:
    return shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) if cuda_home else None


# ------------------------------------------------------------------------------------ compile on first use
def gpu_archs() -> list[str]:
    """The visible GPUs' architectures, with Hopper's arch-specific features (90a) for 9.0."""
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ["90a" if cap == (9, 0) else f"{cap[0]}{cap[1]}" for cap in caps]


def build_directory(archs: list[str], env=os.environ) -> str:
    import torch

    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "persimmon_rt", f"torch{torch.__version__}-sm{'_'.join(archs)}")


def load_on_first_use(env=os.environ):
    """On a GPU machine where the extension was not built at install: compile it with torch's JIT loader
    (cached; later imports only load it) and return the module. Where that cannot work, say so in one
    warning and return None (every op then runs on its PyTorch reference)."""
    if env.get("PERSIMMON_RT_NO_CUDA") == "1":
        return None
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    from torch.utils import cpp_extension

    fallback = "every op runs on its PyTorch reference (PERSIMMON_RT_NO_CUDA=1 silences this)"
    if not os.path.isfile(os.path.join(CSRC, "torch_bindings.cpp")):
        return _warn(f"the CUDA extension is not built and this install has no csrc/ to build it from; "
                     f"{fallback}; install from the repository with nvcc on the machine: {INSTALL}")
    if find_nvcc(cpp_extension.CUDA_HOME) is None:
        return _warn(f"the CUDA extension is not built and nvcc is not found; {fallback}; set CUDA_HOME to the "
                     "CUDA toolkit (the directory with bin/nvcc) and it is compiled on first use")
    if not cpp_extension.is_ninja_available():
        return _warn(f"the CUDA extension is not built and ninja is not found; {fallback}; pip install ninja and "
                     "it is compiled on first use")
    try:
        cxx = pick_cxx(env)
    except RuntimeError as exc:
        return _warn(f"the CUDA extension is not built: {exc}")
    archs = cuda_archs(env, default=";".join(gpu_archs()))
    flags = compile_flags(archs, env.get("PERSIMMON_RT_DEBUG") == "1", shell_quote=True)
    directory = build_directory(archs, env)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(os.path.join(directory, "_C.so")):        # later imports load it from there
        print(f"persimmon_rt: compiling the CUDA extension for sm_{', sm_'.join(archs)} on first use (a few "
              f"minutes once; cached in {directory})", file=sys.stderr)
    previous = os.environ.get("CXX")
    os.environ["CXX"] = cxx                               # torch's loader compiles and links with $CXX
    try:
        return cpp_extension.load(name="_C", sources=sources(), extra_include_paths=[CSRC],
                                  extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
                                  build_directory=directory, verbose=env.get("PERSIMMON_RT_VERBOSE_BUILD") == "1")
    except Exception as exc:                              # a failed build must not take the package down
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _warn(f"compiling the CUDA extension failed ({reason}); {fallback}; PERSIMMON_RT_VERBOSE_BUILD=1 "
                     f"shows the compiler's output, or build it at install: {INSTALL}")
    finally:
        if previous is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = previous


def _warn(message: str) -> None:
    warnings.warn(f"persimmon_rt: {message}", stacklevel=3)
    return None
