"""Graph passes. Importing this package registers every pass with the pass manager."""

from femtocc.passes import (  # noqa: F401  (registers every pass)
    annotate_sparsity, canonicalize, constant_fold, dce, fold_dense, fold_gelu, lower_conv, quantize, select_layout, tile_sram,
)
from femtocc.passes.manager import PASSES, Pass, PassManager, parse_pipeline, register

DEFAULT_PIPELINE = "canonicalize,fold-gelu,fold-dense,dce,annotate-sparsity"

__all__ = ["PASSES", "Pass", "PassManager", "parse_pipeline", "register", "DEFAULT_PIPELINE"]
