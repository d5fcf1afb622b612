"""Workarounds for Apache TVM 0.27 behaviours met on Whisper: the one place to delete them from.

Each workaround is one function here with a test in ``tests/test_tvm.py`` that also checks the TVM
behaviour it works around is still there (``test_tvm_still_needs_*``): when such a test fails, TVM
has been fixed and the workaround can go.

1. :func:`from_onnx` - the ONNX frontend's ``Range`` turns its length into a fresh symbolic size
   (``range_len_0``) even when start, limit and delta are known integer expressions of the graph's
   dims. On the Whisper decoder step, the positions ``Range(0, T)`` then no longer match the token
   embeddings' ``T``, the embedding sum loses its shape, and the next ``Reshape`` fails ("Reshape
   expects the input tensor to have known shape"). Here ``Range`` of integer expressions becomes
   ``arange(start, limit, delta)`` directly, whose length TVM derives from the expressions.
2. :func:`wrap_symbolic_arguments` - ``MergeCompositeFunctions`` fails ("Could not find memo-ized
   group for expression of type ir.Var") when a call left on the CPU takes a symbolic size as an
   argument (the decoder's ``arange(0, T)`` and ``positions + P``): it gives groups to constants,
   shapes and prim expressions, but not to a bare size variable. Wrapping each such argument as
   ``v + 0`` (a prim expression, not a variable) gives it one.
3. :func:`unique_symbols` - external symbols are process-global, so two models with the same graph
   would call each other's regions; every spu001 region gets a per-model suffix.
"""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def _range_of_symbolic_sizes():
    """While active, the ONNX frontend converts ``Range`` of integer expressions to ``arange``."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    original_map, original_range = frontend._get_convert_map, frontend.Range

    class Range(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            values, dtype = [], "int64"
            for x in inputs:
                x = frontend.get_constant(x, params)
                if isinstance(x, tvm.ir.GenericConst) and x.value.numpy().size == 1 and x.value.numpy().dtype.kind == "i":
                    values.append(int(x.value.numpy().item()))
                    dtype = str(x.value.numpy().dtype)
                elif tvm.ir.is_prim_expr(x):
                    values.append(x)
                else:  # a tensor computed at run time: nothing to keep
                    return original_range._impl_v12(bb, inputs, attr, params)
            if all(isinstance(v, int) for v in values):
                return original_range._impl_v12(bb, inputs, attr, params)
            return relax.op.arange(*values, dtype=dtype)

    def convert_map():
        table = original_map()
        table["Range"] = Range
        return table

    frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        frontend._get_convert_map = original_map


def from_onnx(model, **kwargs):
    """``tvm.relax.frontend.onnx.from_onnx`` with workaround 1 (``Range`` keeps its length)."""
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    with _range_of_symbolic_sizes(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Renaming name")  # "past_k.0" -> "past_k_0": expected
        return tvm_from_onnx(model, **kwargs)


def wrap_symbolic_arguments(mod):
    """Workaround 2: in ``main``, every call argument that is a bare symbolic size ``v`` becomes
    ``v + 0``, which ``MergeCompositeFunctions`` can place in a group."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def bare_size(a) -> bool:
        return isinstance(a, tirx.Var) and tvm.ir.is_prim_expr(a)

    @mutator
    class Wrap(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not any(bare_size(a) for a in call.args):
                return call
            args = [tirx.Add(a, tirx.IntImm("int64", 0)) if bare_size(a) else a for a in call.args]
            return relax.Call(call.op, args, call.attrs, call.ty_args)

    mod["main"] = Wrap(mod).visit_expr(mod["main"])
    return mod


def unique_symbols(mod, suffix: str):
    """Workaround 3: give every spu001 region of ``mod`` a per-model suffix."""
    from tvm import relax

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get("Codegen") == "spu001":
            mod[gv] = func.with_attr("global_symbol", f"{func.attrs['global_symbol']}_{suffix}")
    return mod
