#!/usr/bin/env python3
"""How scripts/setup builds llama-cpp-python (the test oracle and tokenizer): CMake flags and cache key.

llama.cpp's default build (`GGML_NATIVE=ON`, i.e. `-march=native`) compiles ggml's AMX matmul
wherever the build machine has AMX-INT8, and that kernel segfaults on such CPUs
(`ggml_backend_amx_mul_mat`; ggml-org/llama.cpp issues, no upstream fix). On x86-64 we therefore
turn `GGML_NATIVE` off and switch on, one by one, the instruction sets this CPU reports, AMX
always excepted: the same fast kernels, without the broken one. On other architectures there is no
AMX and the native build stays.

pip's wheel cache keys a source build on the download only, so a machine that once built an AMX
wheel would reuse it; scripts/setup keeps its own wheel cache under `cache_key()` instead.

Usage: `llama_cpp_build.py cmake-args` prints CMAKE_ARGS; `llama_cpp_build.py cache-key VERSION`
prints the cache folder name. Both read /proc/cpuinfo unless SPLITWISE_CPU_FLAGS gives the flags.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Iterable

#: ggml option → the /proc/cpuinfo flags it needs (ggml-cpu/CMakeLists.txt adds the matching -m flags).
GGML_X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}

#: Never on, whatever the CPU has: the AMX path is the one that crashes.
GGML_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

#: Bump when the rules above change, so cached wheels built under the old rules are not reused.
RULES_VERSION = "1"


def cpu_flags() -> set[str]:
    override = os.environ.get("SPLITWISE_CPU_FLAGS")
    if override is not None:
        return set(override.split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cmake_args(flags: Iterable[str], machine: str) -> list[str]:
    """CMake definitions for llama.cpp on a CPU with these /proc/cpuinfo flags."""
    if machine not in ("x86_64", "AMD64"):
        return []
    have = set(flags)
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in GGML_X86_OPTIONS.items():
        args.append(f"-D{option}={'ON' if all(flag in have for flag in needs) else 'OFF'}")
    args += [f"-D{option}=OFF" for option in GGML_AMX_OPTIONS]
    return args


def cache_key(version: str, args: list[str]) -> str:
    digest = hashlib.sha256("\n".join([RULES_VERSION, version, *args]).encode()).hexdigest()[:16]
    return f"llama-cpp-python-{version}-{digest}"


def main(argv: list[str]) -> int:
    args = cmake_args(cpu_flags(), platform.machine())
    if argv == ["cmake-args"]:
        print(" ".join(args))
        return 0
    if len(argv) == 2 and argv[0] == "cache-key":
        print(cache_key(argv[1], args))
        return 0
    print(f"usage: {sys.argv[0]} cmake-args | cache-key VERSION", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
