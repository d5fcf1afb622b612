"""Graph passes and the named pipelines. Importing this package registers every pass (the generic
ones here, the target's in ``femtocc.targets.spu001``) with the pass manager.

Pipelines are named once, here, and every user (``femtocc eval`` / ``import``, ``femtocc
compile``, the TVM offload) asks for them by name:

* ``float``: the float IR any frontend import is cleaned into (what ``femtocc import`` writes and
  the IR interpreter runs; it still exports to ONNX);
* ``lowered``: ``float`` with convolutions lowered to ``im2col`` + ``dense``, so that every weighted
  layer is a ``dense`` (what calibration measures and every integer target starts from);
* ``spu001``: lowered float IR -> integer, program-ready IR for the spu001 target: quantized (activation
  ranges on the values, from calibration), each weight's storage format chosen, every tensor
  placed in SRAM or external memory. Its options: ``target`` (description file), ``weight-bits``,
  ``act-bits``, ``vocab-bits`` (the token table's), ``tokens`` and ``cached`` (the bounds of T and P
  for tiling).
"""

from femtocc.passes import (  # noqa: F401  (registers every pass)
    annotate_sparsity, canonicalize, constant_fold, dce, fold_dense, fold_gelu, lower_conv, quantize,
)
from femtocc.passes.manager import PASSES, Pass, PassManager, parse_pipeline, register
from femtocc.targets.spu001 import select_layout, tile_sram  # noqa: F401,E402  (target passes)

FLOAT = "canonicalize,fold-gelu,fold-dense,dce,annotate-sparsity"
LOWERED = "canonicalize,fold-gelu,fold-dense,lower-conv,dce,annotate-sparsity"
DEFAULT_PIPELINE = FLOAT


def pipeline(name: str, target: str = "", weight_bits: int = 8, act_bits: int = 16, tokens: int = 1,
             cached: int = 448, vocab_bits: int = 0) -> str:
    """The pass pipeline text of a named pipeline (see the module docstring)."""
    if name == "float":
        return FLOAT
    if name == "lowered":
        return LOWERED
    if name == "spu001":
        where = [f"target={target}"] if target else []
        tile = ",".join(where + [f"tokens={tokens}", f"cached={cached}", f"act-bytes={act_bits // 8}"])
        vocab = f",vocab-bits={vocab_bits}" if vocab_bits else ""
        return f"quantize{{weight-bits={weight_bits},act-bits={act_bits}{vocab}}},select-layout{{{','.join(where)}}},tile-sram{{{tile}}}"
    raise ValueError(f"unknown pipeline {name!r}; known: float, lowered, spu001")


__all__ = ["PASSES", "Pass", "PassManager", "parse_pipeline", "pipeline", "register", "DEFAULT_PIPELINE", "FLOAT"]
