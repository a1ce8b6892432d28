"""Every packed-matmul Triton kernel compiles ahead of time for A100 (sm80) and H100 (sm90): no compile error, no
register spill, shared memory within the target's per-block limit. Runs on a CPU: ptxas ships in the triton wheel.

Covers every binary the launchers can run (kernel_compile.specs: each kernel, bit variant, dtype and table
configuration), at the argument specialization of a Llama-2-70B layer. About a minute on 2 cores with a cold cache.
"""

import importlib.metadata
import importlib.util

import pytest

from frugal_qat.quantizer import kernel_compile
from frugal_qat.quantizer import kernel_configs as kc

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton with its NVIDIA backend is not installed", allow_module_level=True)
# The check reads ptxas's report through triton.knobs (triton >= 3.4); checked without importing triton.
if tuple(int(v) for v in importlib.metadata.version("triton").split(".")[:2]) < (3, 4):
    pytest.skip("the compile check needs triton >= 3.4", allow_module_level=True)


def test_specs_cover_every_kernel_and_configuration():
    specs = kernel_compile.specs(["sm80", "sm90"])
    assert {s.kernel for s in specs} == set(kc.KERNELS)
    for kernel in kc.KERNELS:
        assert {s.config for s in specs if s.kernel == kernel} == set(kc.all_configs(kernel))
    assert {s.bits for s in specs} == set(kc.BIT_VARIANTS) and {s.dtype for s in specs} == set(kc.DTYPES)
    assert len(specs) == len(set(specs))
    with pytest.raises(ValueError, match="sm75"):
        kernel_compile.specs(["sm75"])


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    rows = kernel_compile.compile_all(["sm80", "sm90"])
    assert len(rows) == len(kernel_compile.specs(["sm80", "sm90"]))
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + kernel_compile.format_table(bad)
    assert all(0 < r.registers <= 255 and r.shared_limit > 0 for r in rows)
