"""Compute kernels that are not attention: the int4 weight-only GEMMs (:mod:`.w4a16`), the FP8
W8A8 ones (:mod:`.fp8`), the matmuls on GGUF blocks (:mod:`.gguf_matmul`) and the seeded rows'
sampling noise (:mod:`.sampling`).

This package imports nothing from the rest of pagedattn: the model layers call into it.
"""
