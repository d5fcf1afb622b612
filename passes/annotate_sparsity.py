"""annotate-sparsity: record each weight's sparse encoding on its constant, from its zeros.

For every ``dense`` and ``conv`` node with a constant weight whose zeros allow a sparse format,
the constant gets ``attrs["sparsity"] = {format, nnz, sparsity[, pencils]}`` where format is the
most structured one the zeros fit: ``pencil8`` (whole pencils of 8 output channels), then
``2:4``/``1:4``/``4:8``, then ``unstructured`` (see :func:`femtocc.passes.sparsity.describe`).
Dense weights get no annotation. The data is not changed; later passes (layout selection) read
the annotation.
"""

from __future__ import annotations

from femtocc.passes.manager import Pass, register
from femtocc.passes.sparsity import describe


def weight_out_in(node):
    """The node's weight constant and its data as [out, in], or (None, None)."""
    if node.op == "dense" and node.inputs[1].is_constant:
        w = node.inputs[1]
        return w, w.data.T
    if node.op == "conv" and node.inputs[1].is_constant:
        w = node.inputs[1]
        return w, w.data.reshape(w.data.shape[0], -1)
    return None, None


@register
class AnnotateSparsity(Pass):
    name = "annotate-sparsity"

    def run(self, graph):
        annotated = 0
        for node in graph.nodes:
            const, matrix = weight_out_in(node)
            if const is None:
                continue
            encoding = describe(matrix)
            if encoding["format"] == "dense":
                const.attrs.pop("sparsity", None)
                continue
            const.attrs["sparsity"] = encoding
            annotated += 1
        return {"annotated": annotated}
