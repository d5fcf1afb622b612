"""The float backends ``femtocc eval`` compares: the model in torch, its ONNX export in onnxruntime,
and femtocc's IR (imported, the ``float`` pipeline run) in the IR interpreter.

Kept apart from :mod:`femtocc.decode` (the decoding loop and the runners), which the pruning passes
use: building the IR backend runs passes, and the passes must not import what imports them.
"""

from __future__ import annotations

from femtocc.decode import Backend, GraphBackend, TorchBackend, ir_runner, ort_runner
from femtocc.errors import FemtoccError

BACKENDS = ("torch", "onnxruntime", "ir")


def make_backend(bundle, kind: str, manager=None, progress=None, export_dir=None, buckets=(30,)) -> Backend:
    """``torch``, ``onnxruntime`` or ``ir`` (the IR interpreter, after the passes of ``manager``,
    a :class:`~femtocc.passes.PassManager`; by default the standard pipeline), with the encoder
    context ``buckets`` (seconds; see :mod:`femtocc.frontend.onnx_export`).

    The ONNX graphs come from the export cache, or are written to ``export_dir`` when given.
    """
    if kind == "torch":
        return TorchBackend(bundle, buckets)
    if kind not in BACKENDS:
        raise FemtoccError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    from femtocc.frontend.onnx_export import export_whisper

    paths = export_whisper(bundle, export_dir, progress=progress, buckets=buckets)
    if kind == "onnxruntime":
        return GraphBackend(kind, {w: ort_runner(p) for w, p in paths.items()}, bundle.config)
    if kind == "ir":
        from femtocc.frontend.onnx_export import load_onnx
        from femtocc.frontend.onnx_ir import import_onnx
        from femtocc.passes import PassManager, pipeline

        manager = manager or PassManager.parse(pipeline("float"))
        graphs = {w: manager.run(import_onnx(load_onnx(p), w)) for w, p in paths.items()}
        return GraphBackend(kind, {w: ir_runner(g) for w, g in graphs.items()}, bundle.config)
