"""spu001 as an Apache TVM (0.27, Relax) external codegen: offload what the SPU runs, keep the rest on CPU.

    from femtocc.targets.spu001.tvm import partition_for_spu001
    mod = relax.frontend.onnx.from_onnx(onnx_model)
    mod = partition_for_spu001(mod, runtime="sim")          # or "reference"
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

Patterns (``PATTERNS``) name what spu001 runs: dense (matmul by a constant matrix, with or
without a constant bias), activation matmul (attention), GELU (the exact erf form ONNX exports),
layer norm, softmax over the last axis, additions, scaling by a constant, and the data movement
between them (reshape, permute). Their checks reject what the target cannot run (dynamic shapes,
non-float32, softmax over another axis, matmul of more than two constant dims). ``FuseOpsByPattern``
-> ``MergeCompositeFunctions`` groups neighbours into regions; ``RunCodegen`` calls the codegen
registered under ``relax.ext.spu001``, which for each region registers a packed function under the
region's (per-model unique) symbol. The VM calls it through ``call_dps_packed``: on its first call
the region is translated to femtocc IR, calibrated on that call's inputs (activation ranges, and the
Hessians for OBS when ``sparsity`` is set), pruned, quantized, laid out, tiled and compiled to one
``.spu`` program, which then runs on the reference runtime or the simulator for every call.
Everything else (here: the convolutions' padding, anything unmatched) runs on TVM's CPU backend.

TVM 0.27 behaviours worked around here, each with a test: external symbols are process-global, so
regions get a per-model suffix (:func:`_unique_symbols`). ``FuseOpsByPattern`` runs without
``annotate_codegen`` so that ``MergeCompositeFunctions`` can merge neighbours into one region.
"""

from __future__ import annotations

import itertools

import numpy as np

from femtocc.errors import FemtoccError

_MODELS = itertools.count()
REGIONS: dict[str, "Region"] = {}  # symbol -> region, for reports and tests


def _type(e):
    """The tensor type of a Relax expression (TVM 0.27: ``.ty``), or None."""
    try:
        return e.ty
    except (AttributeError, ValueError):
        return None


def _patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    def static_f32(ctx) -> bool:
        import tvm
        from tvm import relax

        root = ctx.annotated_expr.get("root")
        if root is not None and isinstance(root, relax.Call) and all(isinstance(a, (tvm.ir.GenericConst, relax.ShapeExpr)) for a in root.args):
            return False  # constant folding, not work for the SPU

        for e in ctx.annotated_expr.values():
            ty = _type(e)
            if ty is None:
                continue
            if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None:
                return False
            if not all(hasattr(d, "value") or isinstance(d, int) for d in ty.shape.values):
                return False
        return True

    def last_axis_softmax(ctx) -> bool:
        call = ctx.annotated_expr["root"]
        ty = _type(call.args[0])
        rank = len(ty.shape.values) if ty is not None and ty.shape is not None else -1
        return static_f32(ctx) and int(call.attrs.axis) in (-1, rank - 1)

    def two_d_weight(ctx) -> bool:
        w = ctx.annotated_expr.get("w")
        ty = _type(w)
        return static_f32(ctx) and (w is None or (ty is not None and len(ty.shape.values) == 2))

    x = wildcard()
    w, b, c = is_const(), is_const(), is_const()
    dense = is_op("relax.matmul")(x, w)
    dense_bias = is_op("relax.add")(dense, b)
    gelu_x = wildcard()
    one_plus_erf = is_op("relax.add")(is_op("relax.erf")(is_op("relax.divide")(gelu_x, is_const())), is_const())
    gelu = is_op("relax.multiply")(is_op("relax.multiply")(gelu_x, one_plus_erf), is_const())  # (x * (1 + erf)) * 0.5
    gelu_x2 = wildcard()
    gelu_half_first = is_op("relax.multiply")(  # x * (0.5 * (1 + erf)), the order of torch's ONNX export
        gelu_x2,
        is_op("relax.multiply")(is_const(), is_op("relax.add")(is_op("relax.erf")(is_op("relax.divide")(gelu_x2, is_const())), is_const())),
    )
    def op(name, *args):
        return is_op(name)(*args)

    table = [
        ("spu001.dense_bias", dense_bias, {"x": x, "w": w, "b": b}, two_d_weight),
        ("spu001.dense", dense, {"x": x, "w": w}, two_d_weight),
        ("spu001.gelu", gelu, {}, static_f32),
        ("spu001.gelu", gelu_half_first, {}, static_f32),
        ("spu001.matmul", op("relax.matmul", wildcard(), wildcard()), {}, static_f32),
        ("spu001.layer_norm", op("relax.nn.layer_norm", wildcard(), is_const(), is_const()), {}, static_f32),
        ("spu001.softmax", op("relax.nn.softmax", wildcard()), {}, last_axis_softmax),
        ("spu001.add", op("relax.add", wildcard(), wildcard()), {}, static_f32),
        ("spu001.scale", op("relax.multiply", wildcard(), c), {}, static_f32),
        ("spu001.reshape", op("relax.reshape", wildcard(), wildcard()), {}, static_f32),
        ("spu001.permute", op("relax.permute_dims", wildcard()), {}, static_f32),
    ]
    return [(name, pat, {**ann, "root": pat}, check) for name, pat, ann, check in table]


def patterns():
    """FusionPatterns for spu001 (``tvm.relax.transform.FuseOpsByPattern``)."""
    from tvm.relax.transform import FusionPattern

    return [FusionPattern(name, pat, annotated, check) for name, pat, annotated, check in _patterns()]


# ----------------------------------------------------------------------------- Relax -> femtocc IR


def _shape(ty) -> tuple[int, ...]:
    return tuple(int(d) for d in ty.shape.values)


def region_to_graph(func, name: str):
    """A merged Relax region (calls of composite functions) as one femtocc IR graph."""
    import tvm
    from tvm import relax

    from femtocc.ir import Graph, TensorType

    g = Graph(name)
    env: dict = {}
    for p in func.params:
        env[p] = g.add_input(p.name, TensorType("f32", _shape(p.ty)))

    def value(e, bound):
        if isinstance(e, tvm.ir.GenericConst):
            return g.add_constant("c", e.value.numpy())
        if isinstance(e, relax.ShapeExpr):
            return g.add_constant("shape", np.array([int(v) for v in e.values], np.int64))
        if e in bound:
            return bound[e]
        raise FemtoccError(f"spu001 region {name}: operand {e} is not supported")

    def emit(call, bound, out_var):
        op = call.op.name
        ins = [value(a, bound) for a in call.args]
        t = TensorType("f32", _shape(call.ty))
        attrs = {}
        if op == "relax.matmul":
            ir = "matmul"
        elif op in ("relax.add", "relax.multiply", "relax.divide"):
            ir = {"relax.add": "add", "relax.multiply": "mul", "relax.divide": "div"}[op]
        elif op == "relax.erf":
            ir = "erf"
        elif op == "relax.nn.softmax":
            ir, attrs = "softmax", {"axis": int(call.attrs.axis)}
        elif op == "relax.nn.layer_norm":
            ir, attrs = "layer_norm", {"axis": -1, "epsilon": float(call.attrs.epsilon)}
        elif op == "relax.reshape":
            ir, attrs = "reshape", {"allowzero": 1}
            ins = [ins[0], g.add_constant("shape", np.array(_shape(call.ty), np.int64))]
        elif op == "relax.permute_dims":
            ir = "transpose"
            attrs = {"perm": [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else list(reversed(range(len(t.shape))))}
        else:
            raise FemtoccError(f"spu001 region {name}: op {op} has no femtocc form")
        return g.make_node(ir, ins, [t], attrs, names=[out_var.name]).outputs[0]

    def walk(body, bound) -> list:
        """Emit the bindings of ``body`` (a region, or a composite inside it); its result values."""
        local = {}  # composites bound to a name inside the region
        for block in body.blocks:
            for binding in block.bindings:
                var, v = binding.var, binding.value
                if isinstance(v, relax.Function):
                    local[var] = v
                elif isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar):
                    raise FemtoccError(f"spu001 region {name}: nested global call")
                elif isinstance(v, relax.Call) and (isinstance(v.op, relax.Function) or v.op in local):
                    composite = v.op if isinstance(v.op, relax.Function) else local[v.op]
                    (bound[var],) = walk(composite.body, dict(zip(composite.params, [value(a, bound) for a in v.args])))
                elif isinstance(v, relax.Call):
                    bound[var] = emit(v, bound, var)
                elif isinstance(v, relax.Var):
                    bound[var] = bound[v]
                else:
                    raise FemtoccError(f"spu001 region {name}: binding {var} is not supported")
        result = body.body
        return [value(r, bound) for r in (result.fields if isinstance(result, relax.Tuple) else [result])]

    g.outputs = walk(func.body, dict(env))
    return g


# ----------------------------------------------------------------------------- compile a region


class Region:
    """One offloaded region, compiled to a .spu program on its first call.

    TVM shares one region function between call sites with the same shapes (the q, k and v
    reshapes of a layer, say), so ranges calibrated on the first call need not cover the next
    one: every call's inputs are checked against the calibrated ranges, and a call that exceeds
    them (or saturates an output) widens the ranges with its own data and recompiles."""

    def __init__(self, symbol: str, func, runtime: str, sparsity: float | None):
        from femtocc.passes.calibrate import RangeRecorder

        self.symbol, self.func, self.runtime, self.sparsity = symbol, func, runtime, sparsity
        self.graph = self._float_graph()
        self.recorder = RangeRecorder()
        self.pruned: dict[str, np.ndarray] | None = None
        self.program: bytes | None = None
        self.run_program = None
        self.compiles = 0
        self.stats: list = []

    def _float_graph(self):
        from femtocc.passes import PassManager

        g = region_to_graph(self.func, self.symbol)
        PassManager.parse("canonicalize,fold-gelu,fold-dense,dce").run(g)
        return g

    def _exceeds(self, feeds) -> bool:
        from femtocc.passes.calibrate import range_key

        return any(float(np.abs(feeds[v.name]).max(initial=0)) > self.recorder.ranges.get(range_key(self.graph, v), -1)
                   for v in self.graph.inputs)

    def compile(self, feeds: dict[str, np.ndarray]) -> None:
        import json
        import tempfile
        from pathlib import Path

        from femtocc.passes import PassManager
        from femtocc.targets.spu001 import load
        from femtocc.targets.spu001.codegen import generate

        g = self._float_graph()
        if self.sparsity:
            if self.pruned is None:
                self.pruned = _obs_prune_graph(g, feeds, self.sparsity)
            for name, w in self.pruned.items():
                g.constants[name].data = w
        PassManager.parse("annotate-sparsity").run(g)
        self.recorder.runner(g)(feeds)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ranges.json"
            path.write_text(json.dumps(self.recorder.ranges))
            rows = max((int(np.prod(v.type.shape[:-1])) for v in g.inputs), default=1)
            PassManager.parse(f"quantize{{ranges={path}}},select-layout,tile-sram{{tokens={rows}}}").run(g)
        target = load()
        self.quantized = g
        self.program = generate(g, target).to_bytes()
        self.compiles += 1
        if self.runtime == "sim":
            from femtocc.runtime.sim import SimRuntime

            self.run_program = SimRuntime(self.program, target, self.symbol).runner(self.stats)
        else:
            from femtocc.runtime.program import Program
            from femtocc.runtime.reference import ReferenceRuntime

            self.run_program = ReferenceRuntime(Program.from_bytes(self.program, self.symbol)).runner()

    def __call__(self, *args):
        n_out = len(self.graph.outputs)  # destination-passing style: the outputs come last
        ins, outs = args[:-n_out], args[-n_out:]
        feeds = {v.name: np.asarray(a.numpy()) for v, a in zip(self.graph.inputs, ins)}
        if self.run_program is None or self._exceeds(feeds):
            self.compile(feeds)
        result = self.run_program(feeds)
        if self._saturated(result):  # widen the ranges with this call's data and recompile
            self.compile(feeds)
            result = self.run_program(feeds)
        for v, out in zip(self.graph.outputs, outs):
            out.copyfrom(np.ascontiguousarray(result[v.name], dtype=np.float32))

    def _saturated(self, result) -> bool:
        scales = {n.outputs[0].name: n.attrs["scale"] for n in self.quantized.nodes if n.op == "dequantize"}
        return any(np.abs(result[name]).max(initial=0) >= scale * (2**15 - 1) * 0.999
                   for name, scale in scales.items() if name in result)


def _obs_prune_graph(g, feeds, sparsity: float) -> dict[str, np.ndarray]:
    """OBS pencil8 pruning of every dense weight on Hessians from ``feeds`` (the first call's inputs);
    returns the pruned weights by constant name."""
    from femtocc.ir import Interpreter
    from femtocc.passes.obs import obs_prune
    from femtocc.passes.sparsity import parse_pattern

    inputs, pruned = {}, {}
    dense = [n for n in g.nodes if n.op == "dense" and n.inputs[1].is_constant]
    Interpreter(g).run(feeds, observe=lambda v, a: inputs.__setitem__(id(v), a))
    for v in g.inputs:
        inputs[id(v)] = feeds[v.name]
    for node in dense:
        x = inputs[id(node.inputs[0])].reshape(-1, node.inputs[0].type.shape[-1]).astype(np.float64)
        w = node.inputs[1].data.T
        if w.shape[0] % 8:
            continue
        r = obs_prune(w, 2 * x.T @ x / len(x), sparsity, parse_pattern("pencil8"))
        node.inputs[1].data = np.ascontiguousarray(r.weight.T)
        pruned[node.inputs[1].name] = node.inputs[1].data
    return pruned


# ----------------------------------------------------------------------------- the user's call


def _unique_symbols(mod, suffix: str):
    """Workaround (TVM 0.27): external symbols are process-global, so two models with the same graph
    would call each other's regions. Give every spu001 region of ``mod`` a per-model suffix."""
    from tvm import relax

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get("Codegen") == "spu001":
            mod[gv] = func.with_attr("global_symbol", f"{func.attrs['global_symbol']}_{suffix}")
    return mod


def _register_codegen():
    import tvm

    def codegen(funcs, options, constant_names):
        for f in funcs:
            symbol = str(f.attrs["global_symbol"])
            region = Region(symbol, f, _STATE["runtime"], _STATE["sparsity"])
            REGIONS[symbol] = region
            tvm.register_global_func(symbol, region, override=True)
        return []

    tvm.register_global_func("relax.ext.spu001", codegen, override=True)


_STATE = {"runtime": "reference", "sparsity": None}


def partition_for_spu001(mod, params: dict | None = None, runtime: str = "reference", sparsity: float | None = None):
    """Offload to spu001 what it runs; returns the module ready for ``tvm.compile``.

    ``runtime``: ``reference`` (numpy) or ``sim`` (the C simulator); ``sparsity``: OBS pencil8
    pruning of the offloaded dense layers, calibrated on the first call."""
    from tvm import relax

    if runtime not in ("reference", "sim"):
        raise FemtoccError(f"runtime must be reference or sim, got {runtime!r}")
    _STATE.update(runtime=runtime, sparsity=sparsity)
    _register_codegen()
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    mod = relax.transform.FuseOpsByPattern(patterns(), bind_constants=True, annotate_codegen=False)(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    mod = _unique_symbols(mod, f"m{next(_MODELS)}")
    return relax.transform.RunCodegen()(mod)


def offload_report(mod) -> dict:
    """Which ops stayed on the CPU, and how many spu001 regions the module calls."""
    import tvm
    from tvm import relax

    cpu: dict[str, int] = {}
    spu = 0

    def visit(e):
        nonlocal spu
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed":
                spu += 1
            else:
                cpu[e.op.name] = cpu.get(e.op.name, 0) + 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return {"spu001_regions": spu, "cpu_ops": dict(sorted(cpu.items()))}
