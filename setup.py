"""Builds the optional C kernels of the `starquant` ops on CPU (metadata: pyproject.toml).

`optional=True`: where no C compiler is found the package installs without it, and the op
runs its torch implementation with a named warning (starquant_plugin/serving/quantization/ops.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "starquant_plugin.serving.quantization._sgat_cpu",
            sources=["starquant_plugin/serving/quantization/csrc/sgat_cpu.c",
                     "starquant_plugin/serving/quantization/csrc/int4_vnni.c",
                     "starquant_plugin/serving/quantization/csrc/int8_amx.c",
                     "starquant_plugin/serving/quantization/csrc/sgat_avx512.c"],
            depends=["starquant_plugin/serving/quantization/csrc/int4_vnni.h",
                     "starquant_plugin/serving/quantization/csrc/int8_amx.h",
                     "starquant_plugin/serving/quantization/csrc/sgat_avx512.h",
                     "starquant_plugin/serving/quantization/csrc/vec16.h"],
            extra_compile_args=["-O3", "-fno-math-errno", "-std=c11", "-fopenmp"],
            extra_link_args=["-fopenmp"],  # libgomp.so.1: under torch, the runtime torch loaded
            optional=True,
        )
    ]
)
