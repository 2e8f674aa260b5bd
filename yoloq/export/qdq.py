"""Graph passes on exported QDQ ONNX models.

propagate_qdq: ORT only runs an op in int8 when every input comes from a DequantizeLinear and its output goes into
a QuantizeLinear. Split, MaxPool, nearest Resize, Reshape and friends only move or select values, so their output
lies on their input's grid; repeating the input's Q/DQ after them is exact, and lets ORT drop the pair and keep the
data int8 (a conv fed straight from a Split would otherwise stay float).

pack_int4: weights whose codes fit in [-8, 7] are stored as ONNX int4 (opset 21) to halve the file; ORT runs these
as DequantizeLinear + float Conv, so it trades speed for size.
"""

from __future__ import annotations

from collections import defaultdict

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

PASS_THROUGH = {"Split", "MaxPool", "Resize", "Reshape", "Slice", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}


def _value_preserving(node: onnx.NodeProto) -> bool:
    if node.op_type != "Resize":
        return node.op_type in PASS_THROUGH
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    return mode == "nearest"


def propagate_qdq(model: onnx.ModelProto) -> int:
    """Insert Q/DQ (same scale and zero point as the input's DQ) after value-preserving ops. Returns how many."""
    g = model.graph
    inserted = 0
    changed = True
    while changed:
        changed = False
        producer = {o: n for n in g.node for o in n.output}
        consumers = defaultdict(list)
        for n in g.node:
            for i in n.input:
                consumers[i].append(n)
        graph_outputs = {o.name for o in g.output}
        new_nodes = []
        for node in g.node:
            new_nodes.append(node)
            if not _value_preserving(node) or not node.input:
                continue
            dq = producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or any(a.name == "axis" for a in dq.attribute):
                continue
            for out in node.output:
                users = consumers.get(out, [])
                if out in graph_outputs or not users or all(u.op_type == "QuantizeLinear" for u in users):
                    continue
                q_out, dq_out = f"{out}__q", f"{out}__dq"
                new_nodes.append(helper.make_node("QuantizeLinear", [out, *dq.input[1:]], [q_out], name=f"{node.name}_{out}_Q"))
                new_nodes.append(helper.make_node("DequantizeLinear", [q_out, *dq.input[1:]], [dq_out], name=f"{node.name}_{out}_DQ"))
                for u in users:
                    for k, name in enumerate(u.input):
                        if name == out:
                            u.input[k] = dq_out
                inserted += 1
                changed = True
        del g.node[:]
        g.node.extend(new_nodes)
    return inserted


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def pack_int4(model: onnx.ModelProto) -> int:
    """Store per-channel weight codes in [-8, 7] as int4 initializers. Returns how many tensors were packed."""
    consts = _constants(model)
    g = model.graph
    packed = 0
    targets = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute):
            w, z = consts.get(n.input[0]), consts.get(n.input[2]) if len(n.input) > 2 else None
            if w is not None and w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7:
                targets[n.input[0]] = w
                if z is not None:
                    targets[n.input[2]] = z.astype(np.int8)
    keep = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in targets)]
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name not in targets]
    del g.initializer[:]
    g.initializer.extend(inits)
    for name, arr in targets.items():
        # numpy_helper packs two int4 values per byte (raw_data); a value list would store one per int32
        g.initializer.append(numpy_helper.from_array(arr.astype(ml_dtypes.int4), name))
        packed += arr.ndim > 1
    return packed
