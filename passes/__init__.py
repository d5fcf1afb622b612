"""Graph passes. Importing this package registers every pass with the pass manager."""

from femtocc.passes import annotate_sparsity, canonicalize, constant_fold, dce, fold_dense, fold_gelu, quantize, select_layout, tile_sram  # noqa: F401
from femtocc.passes.manager import PASSES, Pass, PassManager, parse_pipeline, register

DEFAULT_PIPELINE = "canonicalize,fold-gelu,fold-dense,dce,annotate-sparsity"

__all__ = ["PASSES", "Pass", "PassManager", "parse_pipeline", "register", "DEFAULT_PIPELINE"]
