"""The CPU kernels' AVX2 clones are vectorized in the built extension.

An x86 CPU without AVX-512 (Zen 1-3, most Intel client parts) runs the `arch=x86-64-v3` clone of
each row loop. Built without -fno-trapping-math, GCC kept a branch in every select of those loops
and left that clone scalar: ~5x slower, with every result still right, so no value test notices.
This reads the machine code of the shipped library instead.
"""
import platform
import re
import shutil
import subprocess

import pytest
import torch  # noqa: F401  (kdengine._C links against torch's libraries)

ROW_LOOPS = ("forward_rows_f32", "forward_rows_bf16", "forward_rows_f16",
             "backward_rows_f32", "backward_rows_bf16", "backward_rows_f16")
PACKED_YMM_MATH = re.compile(r"\tv(?:fn?m(?:add|sub)\d*|mul|add|sub|max)ps\s.*%ymm")
MIN_PACKED = 20  # the vectorized clones have 29-84 such instructions; the scalar build had 0-3


def _clones(library):
    """{symbol: machine code} of the v3 clones of the row loops, from objdump."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout
    clones = {}
    for block in text.split("\n\n"):
        header = re.search(r"<(\S+)>:\n", block)
        if header and ".arch_x86_64_v3" in header.group(1):
            name = header.group(1)
            if any(loop in name for loop in ROW_LOOPS):
                clones[name] = block
    return clones


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the target clones are x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_avx2_clones_of_the_row_loops_are_vectorized():
    from kdengine import _C

    clones = _clones(_C.__file__)
    # sparse KL: 3 dtypes x forward/backward; sampled KL: 3 dtypes x forward
    assert len(clones) == 9, sorted(clones)
    packed = {name: len(PACKED_YMM_MATH.findall(code)) for name, code in clones.items()}
    scalar = {name: n for name, n in packed.items() if n < MIN_PACKED}
    assert not scalar, f"AVX2 clones left (nearly) scalar, packed ymm math per clone: {scalar}; is -fno-trapping-math in setup.py?"
