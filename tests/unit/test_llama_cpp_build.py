"""llama.cpp (the test oracle and tokenizer) is built with this CPU's instruction sets but never
ggml's AMX matmul, which segfaults on AMX CPUs (scripts/llama_cpp_build.py, docs/engine.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "llama_cpp_build.py"

#: /proc/cpuinfo flags of a Sapphire Rapids VM (trimmed to what matters here).
SAPPHIRE_RAPIDS = [
    *("fpu", "sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"),
    *("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    *("avx_vnni", "amx_bf16", "amx_tile", "amx_int8"),
]
ZEN3 = ["fpu", "sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"]


@pytest.fixture(scope="module")
def rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_cpp_build", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llama_cpp_build", module)
    spec.loader.exec_module(module)
    return module


def definitions(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("-D").split("=", 1) for arg in args)


def test_an_amx_cpu_gets_its_avx512_kernels_but_no_amx(rules: ModuleType) -> None:
    got = definitions(rules.cmake_args(SAPPHIRE_RAPIDS, "x86_64"))
    assert got["GGML_NATIVE"] == "OFF"  # -march=native would turn AMX back on
    assert {got[o] for o in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")} == {"OFF"}
    for option in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):
        assert got[option] == "ON", option


def test_an_avx2_cpu_gets_no_avx512(rules: ModuleType) -> None:
    got = definitions(rules.cmake_args(ZEN3, "x86_64"))
    assert got["GGML_AVX2"] == got["GGML_FMA"] == "ON"
    assert got["GGML_AVX512"] == got["GGML_AVX512_VNNI"] == "OFF"
    # AVX-512 needs all five subsets ggml compiles for, not just the foundation.
    assert definitions(rules.cmake_args([*ZEN3, "avx512f"], "x86_64"))["GGML_AVX512"] == "OFF"


def test_other_architectures_keep_the_native_build(rules: ModuleType) -> None:
    assert rules.cmake_args(["asimd", "fphp", "sve"], "aarch64") == []


def test_the_wheel_cache_key_changes_with_the_flags_and_the_version(rules: ModuleType) -> None:
    amx, avx2 = rules.cmake_args(SAPPHIRE_RAPIDS, "x86_64"), rules.cmake_args(ZEN3, "x86_64")
    keys = {rules.cache_key("0.3.36", amx), rules.cache_key("0.3.36", avx2), rules.cache_key("0.3.35", avx2)}
    assert len(keys) == 3
    assert rules.cache_key("0.3.36", amx) == rules.cache_key("0.3.36", list(amx))


def system_info() -> str:
    import llama_cpp

    return str(llama_cpp.llama_print_system_info().decode())


def test_installed_llama_cpp_has_no_amx_on_an_amx_machine(rules: ModuleType) -> None:
    if "amx_int8" not in rules.cpu_flags():
        pytest.skip("this CPU has no AMX-INT8: the crashing kernel could not be built here anyway")
    info = system_info()
    assert "AMX_INT8 = 1" not in info, f"llama.cpp was built with the AMX path that segfaults: {info}"


def test_installed_llama_cpp_uses_this_cpus_vector_kernels(rules: ModuleType) -> None:
    """GGML_NATIVE is off, so each instruction set must have been switched on by hand."""
    flags, info = rules.cpu_flags(), system_info()
    expected = {"AVX2 = 1": {"avx2"}, "FMA = 1": {"fma"}, "F16C = 1": {"f16c"}}
    expected["AVX512 = 1"] = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
    for feature, needs in expected.items():
        if needs <= flags:
            assert feature in info, f"{feature} missing from llama.cpp's build on a CPU with {sorted(needs)}: {info}"
