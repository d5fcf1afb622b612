"""spu001 as an Apache TVM (0.27, Relax) external codegen: offload what the SPU runs, keep the rest on CPU.

    from femtocc.targets.spu001.tvm import partition_for_spu001
    from femtocc.targets.spu001.tvm_workarounds import from_onnx   # TVM's, with a Range fix
    mod = from_onnx(onnx_model)
    mod = partition_for_spu001(mod, runtime="sim")          # or "reference"
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

Patterns (``patterns()``) name what spu001 runs: dense (matmul by a constant matrix, with or
without a constant bias), activation matmul (attention), GELU (the exact erf form ONNX exports),
layer norm, softmax over the last axis, additions, scaling by a constant, and the data movement
between them (reshape, permute). Their checks reject what the target cannot run (non-float32, dims
that are not integer sums of at most two symbolic sizes, softmax over another axis, matmul of more
than two constant dims). Symbolic sizes (the decoder step's tokens ``T`` and cached positions
``P``) become the program's ``T`` and ``P``, bound from the inputs on every call. ``FuseOpsByPattern``
-> ``MergeCompositeFunctions`` groups neighbours into regions; ``RunCodegen`` calls the codegen
registered under ``relax.ext.spu001``, which for each region registers a packed function under the
region's (per-model unique) symbol. The VM calls it through ``call_dps_packed``: on its first call
the region is translated to femtocc IR, calibrated on that call's inputs (activation ranges, and the
Hessians for OBS when ``sparsity`` is set), pruned, quantized, laid out, tiled and compiled to one
``.spu`` program, which then runs on the reference runtime or the simulator for every call.
Everything else (convolutions, the decoder's embedding lookups, masks, KV-cache concatenation,
anything unmatched) runs on TVM's CPU backend.

``FuseOpsByPattern`` runs without ``annotate_codegen`` so that ``MergeCompositeFunctions`` can merge
neighbours into one region. TVM 0.27 bugs are worked around in :mod:`.tvm_workarounds`.
"""

from __future__ import annotations

import itertools

import numpy as np

from femtocc.errors import FemtoccError
from femtocc.targets.spu001 import tvm_workarounds as workarounds

_MODELS = itertools.count()
REGIONS: dict[str, "Region"] = {}  # symbol -> region, for reports and tests


def affine_terms(expr) -> dict[str, int] | None:
    """A TVM dimension as ``{symbol: coefficient, "": constant}``, or None if it is not an integer
    sum of symbols (``T_1 + P`` -> ``{"T_1": 1, "P": 1}``)."""
    from tvm import tirx

    if isinstance(expr, int):
        return {"": expr}
    if isinstance(expr, tirx.IntImm):
        return {"": int(expr.value)}
    if isinstance(expr, tirx.Var):
        return {expr.name: 1}
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        a, b = affine_terms(expr.a), affine_terms(expr.b)
        if a is None or b is None:
            return None
        sign = 1 if isinstance(expr, tirx.Add) else -1
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0) + sign * v
        return {k: v for k, v in out.items() if v}
    if isinstance(expr, tirx.Mul):
        a, b = affine_terms(expr.a), affine_terms(expr.b)
        if a is None or b is None:
            return None
        if set(b) <= {""}:
            a, b = b, a
        if not set(a) <= {""}:
            return None  # a product of two symbols
        return {k: v * a.get("", 0) for k, v in b.items() if v * a.get("", 0)}
    return None


def _type(e):
    """The tensor type of a Relax expression (TVM 0.27: ``.ty``), or None."""
    try:
        return e.ty
    except (AttributeError, ValueError):
        return None


def _patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    def supported_f32(ctx) -> bool:
        """float32 with every dim a constant or an integer sum of at most two symbolic sizes (T, P)."""
        import tvm
        from tvm import relax

        root = ctx.annotated_expr.get("root")
        if root is not None and isinstance(root, relax.Call) and all(isinstance(a, (tvm.ir.GenericConst, relax.ShapeExpr)) for a in root.args):
            return False  # constant folding, not work for the SPU

        symbols: set[str] = set()
        for e in ctx.annotated_expr.values():
            ty = _type(e)
            if ty is None:
                continue
            if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None:
                return False
            for d in ty.shape.values:
                terms = affine_terms(d)
                if terms is None:
                    return False
                symbols.update(k for k in terms if k)
        return len(symbols) <= 2

    def last_axis_softmax(ctx) -> bool:
        call = ctx.annotated_expr["root"]
        ty = _type(call.args[0])
        rank = len(ty.shape.values) if ty is not None and ty.shape is not None else -1
        return supported_f32(ctx) and int(call.attrs.axis) in (-1, rank - 1)

    def two_d_weight(ctx) -> bool:
        w = ctx.annotated_expr.get("w")
        ty = _type(w)
        return supported_f32(ctx) and (w is None or (ty is not None and len(ty.shape.values) == 2))

    def plain_conv1d(ctx) -> bool:
        a = ctx.annotated_expr["root"].attrs
        return supported_f32(ctx) and int(a.groups) == 1 and (a.data_layout, a.kernel_layout, a.out_layout) == ("NCW", "OIW", "NCW")

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
        ("spu001.conv1d", op("relax.nn.conv1d", wildcard(), is_const()), {}, plain_conv1d),
        ("spu001.gelu", gelu, {}, supported_f32),
        ("spu001.gelu", gelu_half_first, {}, supported_f32),
        ("spu001.matmul", op("relax.matmul", wildcard(), wildcard()), {}, supported_f32),
        ("spu001.layer_norm", op("relax.nn.layer_norm", wildcard(), is_const(), is_const()), {}, supported_f32),
        ("spu001.softmax", op("relax.nn.softmax", wildcard()), {}, last_axis_softmax),
        ("spu001.add", op("relax.add", wildcard(), wildcard()), {}, supported_f32),
        ("spu001.scale", op("relax.multiply", wildcard(), c), {}, supported_f32),
        ("spu001.reshape", op("relax.reshape", wildcard(), wildcard()), {}, supported_f32),
        ("spu001.permute", op("relax.permute_dims", wildcard()), {}, supported_f32),
    ]
    return [(name, pat, {**ann, "root": pat}, check) for name, pat, ann, check in table]


def patterns():
    """FusionPatterns for spu001 (``tvm.relax.transform.FuseOpsByPattern``)."""
    from tvm.relax.transform import FusionPattern

    return [FusionPattern(name, pat, annotated, check) for name, pat, annotated, check in _patterns()]


# ----------------------------------------------------------------------------- Relax -> femtocc IR


def region_to_graph(func, name: str):
    """A merged Relax region (calls of composite functions) as one femtocc IR graph.

    The region's symbolic sizes (at most two, e.g. the decoder's ``T_1`` and ``P``) become the
    IR's ``T`` and ``P`` in order of first appearance in its parameters; programs bind them from
    their inputs' shapes on every call."""
    import tvm
    from tvm import relax

    from femtocc.ir import Graph, TensorType, dims

    symbols: dict[str, str] = {}

    def dim(d):
        terms = affine_terms(d)
        if terms is None:
            raise FemtoccError(f"spu001 region {name}: dimension {d} is not a sum of symbolic sizes")
        for k in sorted(k for k in terms if k):
            if k not in symbols:
                if len(symbols) == 2:
                    raise FemtoccError(f"spu001 region {name}: more than two symbolic sizes ({', '.join(symbols)}, {k})")
                symbols[k] = ("T", "P")[len(symbols)]
        return dims.render({symbols.get(k, k): v for k, v in terms.items()})

    def shape(ty) -> tuple:
        return tuple(dim(d) for d in ty.shape.values)

    def shape_constant(values) -> np.ndarray:
        """A shape operand: static dims as they are, the one symbolic dim as -1 (inferred)."""
        out = [d if isinstance(d, int) else -1 for d in (dim(v) for v in values)]
        if out.count(-1) > 1:
            raise FemtoccError(f"spu001 region {name}: shape {list(values)} has more than one symbolic dim")
        return np.array(out, np.int64)

    g = Graph(name)
    env: dict = {}
    for p in func.params:
        # a shape parameter carries symbolic sizes (reshape targets): the program binds them from its inputs
        is_shape = isinstance(p.ty, relax.ShapeType)
        env[p] = None if is_shape else g.add_input(p.name, TensorType("f32", shape(p.ty)))

    def value(e, bound):
        if isinstance(e, tvm.ir.GenericConst):
            return g.add_constant("c", e.value.numpy())
        if isinstance(e, relax.ShapeExpr):
            return None  # a reshape target: reshape takes its target from its result type
        if e in bound:
            return bound[e]
        raise FemtoccError(f"spu001 region {name}: operand {e} is not supported")

    def emit(call, bound, out_var):
        op = call.op.name
        ins = [value(a, bound) for a in (call.args[:1] if op == "relax.reshape" else call.args)]
        t = TensorType("f32", shape(call.ty))
        attrs = {}
        if op == "relax.matmul":
            ir = "matmul"
        elif op in ("relax.add", "relax.multiply", "relax.divide"):
            ir = {"relax.add": "add", "relax.multiply": "mul", "relax.divide": "div"}[op]
        elif op == "relax.erf":
            ir = "erf"
        elif op == "relax.nn.conv1d":
            a = call.attrs
            ir = "conv"
            attrs = {"strides": [int(a.strides[0])], "dilations": [int(a.dilation[0])], "pads": [int(p) for p in a.padding]}
        elif op == "relax.nn.softmax":
            ir, attrs = "softmax", {"axis": int(call.attrs.axis)}
        elif op == "relax.nn.layer_norm":
            ir, attrs = "layer_norm", {"axis": -1, "epsilon": float(call.attrs.epsilon)}
        elif op == "relax.reshape":
            ir, attrs = "reshape", {"allowzero": 1}
            ins.append(g.add_constant("shape", shape_constant(call.ty.shape.values)))
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
        self.last_call: tuple[dict, dict] | None = None  # (inputs, outputs) of the latest call

    def _float_graph(self):
        from femtocc.passes import PassManager, pipeline

        g = region_to_graph(self.func, self.symbol)
        PassManager.parse(pipeline("lowered")).run(g)
        return g

    def _exceeds(self, feeds) -> bool:
        from femtocc.passes.calibrate import finite_peak, range_key

        return any(finite_peak(feeds[v.name]) > self.recorder.ranges.get(range_key(self.graph, v), -1)
                   for v in self.graph.inputs)

    def compile(self, feeds: dict[str, np.ndarray]) -> None:
        from femtocc.passes import PassManager, pipeline
        from femtocc.passes.calibrate import attach_ranges
        from femtocc.runtime.program import solve_sizes
        from femtocc.targets.spu001 import load
        from femtocc.targets.spu001.codegen import generate, program_dim

        g = self._float_graph()
        if self.sparsity:
            if self.pruned is None:
                self.pruned = _obs_prune_graph(g, feeds, self.sparsity, load().facts.pencil)
            for name, w in self.pruned.items():
                g.constants[name].data = w
        PassManager.parse("annotate-sparsity").run(g)
        self.recorder.runner(g)(feeds)
        attach_ranges({self.symbol: g}, self.recorder.ranges)
        sizes = solve_sizes([(self.symbol, program_dim(d, v.name), n) for v in g.inputs  # tile for this call's T and P
                             for d, n in zip(v.type.shape, feeds[v.name].shape)])
        PassManager.parse(pipeline("spu001", tokens=sizes["T"] or 1, cached=sizes["P"])).run(g)
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
        from tvm import relax

        n_out = len(self.graph.outputs)  # destination-passing style: the outputs come last
        ins, outs = args[:-n_out], args[-n_out:]
        tensors = [a for p, a in zip(self.func.params, ins) if not isinstance(p.ty, relax.ShapeType)]
        feeds = {v.name: np.asarray(a.numpy()) for v, a in zip(self.graph.inputs, tensors)}
        if self.run_program is None or self._exceeds(feeds):
            self.compile(feeds)
        result = self.run_program(feeds)
        if self._saturated(result):  # widen the ranges with this call's data and recompile
            self.compile(feeds)
            result = self.run_program(feeds)
        self.last_call = (feeds, result)
        for v, out in zip(self.graph.outputs, outs):
            out.copyfrom(np.ascontiguousarray(result[v.name], dtype=np.float32))

    def _saturated(self, result) -> bool:
        scales = {n.outputs[0].name: n.attrs["scale"] for n in self.quantized.nodes if n.op == "dequantize"}
        return any(np.abs(result[name]).max(initial=0) >= scale * (2**15 - 1) * 0.999
                   for name, scale in scales.items() if name in result)


def _obs_prune_graph(g, feeds, sparsity: float, pencil: int = 8) -> dict[str, np.ndarray]:
    """OBS pruning in the target's pencils of every dense weight on Hessians from ``feeds`` (the first
    call's inputs); returns the pruned weights by constant name."""
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
        if w.shape[0] % pencil:
            continue
        r = obs_prune(w, 2 * x.T @ x / len(x), sparsity, parse_pattern(f"pencil{pencil}"))
        node.inputs[1].data = np.ascontiguousarray(r.weight.T)
        pruned[node.inputs[1].name] = node.inputs[1].data
    return pruned


# ----------------------------------------------------------------------------- the user's call


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
    mod = relax.transform.FoldConstant()(mod)  # e.g. a conv bias reshaped to [1, C, 1]: a constant, not work
    mod = relax.transform.FuseOpsByPattern(patterns(), bind_constants=True, annotate_codegen=False)(mod)
    mod = relax.transform.MergeCompositeFunctions()(workarounds.wrap_symbolic_arguments(mod))
    mod = workarounds.unique_symbols(mod, f"m{next(_MODELS)}")
    return relax.transform.RunCodegen()(mod)


def offload_report(mod) -> dict:
    """How many spu001 regions the module calls, the femtocc ops they run (per call), and the ops
    that stayed on the CPU."""
    import tvm
    from tvm import relax

    cpu: dict[str, int] = {}
    spu: dict[str, int] = {}
    regions = 0

    def visit(e):
        nonlocal regions
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed":
                regions += 1
                region = REGIONS.get(str(e.args[0].global_symbol))
                for op, n in (region.graph.op_counts() if region else {}).items():
                    spu[op] = spu.get(op, 0) + n
            else:
                cpu[e.op.name] = cpu.get(e.op.name, 0) + 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return {"spu001_regions": regions, "spu001_ops": dict(sorted(spu.items())), "cpu_ops": dict(sorted(cpu.items()))}


def tvm_runner(onnx_path, runtime: str = "reference", sparsity: float | None = None):
    """A graph runner (feeds by ONNX input name -> outputs by ONNX output name) for one exported
    graph, imported into TVM, partitioned for spu001 and compiled for the CPU; the harness's
    :class:`femtocc.decode.GraphBackend` drives it like onnxruntime. ``run.report`` is the
    module's :func:`offload_report`."""
    import onnx
    import tvm
    from tvm import relax

    model = onnx.load(str(onnx_path))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    mod = partition_for_spu001(workarounds.from_onnx(model), runtime=runtime, sparsity=sparsity)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

    def run(feeds):
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise FemtoccError(f"{onnx_path}: inputs {', '.join(missing)} were not given (expected {', '.join(inputs)})")
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in inputs])
        results = result if len(outputs) > 1 else [result]
        return {name: r.numpy() for name, r in zip(outputs, results)}

    run.report = offload_report(mod)
    return run
