"""Compute kernels that are not attention: the int4 weight-only GEMMs (:mod:`.w4a16`), the FP8
W8A8 ones (:mod:`.fp8`), the matmuls on GGUF blocks (:mod:`.gguf_matmul`) and the GPU's sampling
(:mod:`.sampling`: the random choice and the filters' thresholds).

It imports nothing from the rest of pagedattn but its environment switches (`envs`): the
model layers and the sampler call into it.
"""
