"""The dtype a model is served in follows the machine's hardware precisions."""

import warnings

import pytest

import torch

from starquant_plugin.serving.hardware import EmulatedPrecisionWarning, hardware_precisions, matmul_dtype, serving_dtype

WITH_BF16 = {"fp32": True, "bf16": True, "int8": True}
WITHOUT_BF16 = {"fp32": True, "bf16": False, "int8": False}  # e.g. an AVX2-only EPYC


def test_cpu_flags_name_the_precisions():
    assert hardware_precisions({"avx2"}) == {"fp32": True, "bf16": False, "int8": False}
    assert hardware_precisions({"avx512_vnni", "amx_bf16"}) == {"fp32": True, "bf16": True, "int8": True}
    assert set(hardware_precisions()) == {"fp32", "bf16", "int8"}  # this machine's


def test_auto_serves_a_bf16_checkpoint_in_float32_without_bf16_units():
    assert serving_dtype("auto", "bfloat16", WITHOUT_BF16) == "float32"
    assert serving_dtype("auto", "bfloat16", WITH_BF16) == "bfloat16"
    assert serving_dtype("auto", "float32", WITHOUT_BF16) == "float32"


def test_explicit_bf16_without_bf16_units_warns_by_name():
    with pytest.warns(EmulatedPrecisionWarning, match="no bf16 units"):
        assert serving_dtype("bfloat16", "float32", WITHOUT_BF16) == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert serving_dtype("bfloat16", "float32", WITH_BF16) == "bfloat16"


def test_tac_matmuls_run_in_bf16_only_on_cpus_with_bf16_units():
    assert matmul_dtype(torch.bfloat16, "cpu", WITH_BF16) == torch.bfloat16
    assert matmul_dtype(torch.bfloat16, "cpu", WITHOUT_BF16) == torch.float32
    assert matmul_dtype(torch.float16, "cpu", WITH_BF16) == torch.float32
    assert matmul_dtype(torch.float32, "cpu", WITHOUT_BF16) == torch.float32
    assert matmul_dtype(torch.bfloat16, "cuda", WITHOUT_BF16) == torch.bfloat16  # the GPU's own kernels
