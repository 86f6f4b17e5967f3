"""The feature extractor's convs as per-frame dynamic INT8, built from standard ONNX ops.

Static INT8 gives a conv's activations one scale per tensor: the quiet frames
of a transient window round to a constant, and the per-frame LayerNorm after
the feature extractor amplifies that back to full scale (``quantize.py``).
Here every frame gets its own scale, computed per call, so a quiet frame keeps
8-bit precision relative to itself. A conv of kernel K and stride S over
frames in [batch, time, channels] layout becomes, per tap k, one u8 x s8
GEMM over the frames S*t + k, scaled by each frame's scale and the weights'
per-output-channel scale, and the K products summed:

    x [B, T, C] -> per-frame max |x| -> QuantizeLinear (axis 0, uint8 around 128)
      -> pad/trim to S * P frames -> [B, P, S * C] -> tap k: frames S*(t + k // S) + k % S
      -> MatMulInteger with W[:, :, k] (7-bit, per output channel) -> x frame scale x weight scale
      -> Sum over taps -> [B, T', C_out]

Weights are 7-bit (as in the CPU recipe) so no CPU class saturates. The
convs converted must be a run that ends at the last one: the layout moves to
[batch, time, channels] once, before the first, and the Transpose the
exported graph has after the last conv's GELU becomes an Identity.

Measured, not shipped (``benchmarks/int8_layers.py``, variant "per-frame
conv1..conv6"): faster than the fp32 convs on an AMX-INT8 Xeon, but
the real-music neighbour agreement falls below the gate (docs/export.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mert_indexer.errors import ExportError

ZERO_POINT = 128  # uint8 activations, symmetric around 128: levels -127..127
LEVELS = 127.0
WEIGHT_LEVELS = 64.0  # 7-bit weights: u8 x s8 pair sums stay within int16


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def per_frame_convs(model: Any, layers: tuple[int, ...], feature_convs: list[str]) -> Any:
    """``model`` with the feature-extractor convs ``layers`` (indices into ``feature_convs``,
    a run ending at the last) rewritten as per-frame dynamic INT8; the model is changed in place."""
    from onnx import TensorProto, helper, numpy_helper

    if not layers:
        return model
    last = len(feature_convs) - 1
    if sorted(layers) != list(range(min(layers), last + 1)) or min(layers) < 1:
        raise ExportError(
            f"per-frame INT8 convs must be a run ending at conv{last} (not conv0); got {layers}"
        )
    graph = model.graph
    nodes = list(graph.node)
    by_name = {node.name: node for node in nodes}
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    frames = int(graph.input[0].type.tensor_type.shape.dim[1].dim_value)
    if frames <= 0:
        raise ExportError("per-frame INT8 convs need the model's window length in its input shape")
    lengths = [frames]  # frames into each feature conv, then out of the last
    for name in feature_convs:
        node = by_name[name]
        kernel, stride = _attr(node, "kernel_shape", [1])[0], _attr(node, "strides", [1])[0]
        lengths.append((lengths[-1] - kernel) // stride + 1)

    new_inits: list[Any] = []
    replaced: dict[str, list[Any]] = {}

    def const(name: str, value: Any) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    zp = const("pf_zero_point", np.uint8(ZERO_POINT))
    wzp = const("pf_weight_zero_point", np.int8(0))
    eps = const("pf_eps", np.float32(1e-30))
    inv = const("pf_inv_levels", np.float32(1.0 / LEVELS))
    axis1 = const("pf_axis1", np.array([1], np.int64))
    axes12 = const("pf_axes12", np.array([1, 2], np.int64))

    first = by_name[feature_convs[min(layers)]]
    btc = f"{first.input[0]}_btc"
    transpose_in = helper.make_node(
        "Transpose", [first.input[0]], [btc], perm=[0, 2, 1], name=f"{first.name}_pf_to_btc"
    )
    for index in sorted(layers):
        node = by_name[feature_convs[index]]
        if _attr(node, "group", 1) != 1 or any(_attr(node, "pads", [0, 0])):
            raise ExportError(f"{node.name}: per-frame INT8 needs an unpadded, ungrouped conv")
        if _attr(node, "dilations", [1])[0] != 1:
            raise ExportError(f"{node.name}: per-frame INT8 needs an undilated conv")
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        _, c_in, kernel = weight.shape
        stride = int(_attr(node, "strides", [1])[0])
        t_in, t_out = lengths[index], lengths[index + 1]
        pairs = t_out + (kernel - 1) // stride  # groups of ``stride`` frames the taps need
        used = pairs * stride
        p = f"{node.name}_pf"
        x = btc if index == min(layers) else node.input[0]
        out: list[Any] = []
        rows = const(f"{p}_rows", np.array([-1, c_in], np.int64))
        out += [
            helper.make_node("Reshape", [x, rows], [f"{p}_r"], name=f"{p}_reshape"),
            helper.make_node(
                "ReduceMax", [f"{p}_r", axis1], [f"{p}_max"], keepdims=0, name=f"{p}_max"
            ),
            helper.make_node(
                "ReduceMin", [f"{p}_r", axis1], [f"{p}_min"], keepdims=0, name=f"{p}_min"
            ),
            helper.make_node("Neg", [f"{p}_min"], [f"{p}_negmin"], name=f"{p}_neg"),
            helper.make_node(
                "Max", [f"{p}_max", f"{p}_negmin", eps], [f"{p}_absmax"], name=f"{p}_absmax"
            ),
            helper.make_node("Mul", [f"{p}_absmax", inv], [f"{p}_scale"], name=f"{p}_scale"),
            helper.make_node("Shape", [f"{p}_scale"], [f"{p}_scale_shape"], name=f"{p}_shape"),
            helper.make_node("Expand", [zp, f"{p}_scale_shape"], [f"{p}_zps"], name=f"{p}_zps"),
            helper.make_node(
                "QuantizeLinear",
                [f"{p}_r", f"{p}_scale", f"{p}_zps"],
                [f"{p}_q"],
                axis=0,
                name=f"{p}_quantize",
            ),
        ]
        shape3 = const(f"{p}_frames", np.array([-1, t_in, c_in], np.int64))
        scale3 = const(f"{p}_scale_frames", np.array([-1, t_in, 1], np.int64))
        out += [
            helper.make_node("Reshape", [f"{p}_q", shape3], [f"{p}_q3"], name=f"{p}_q3"),
            helper.make_node("Reshape", [f"{p}_scale", scale3], [f"{p}_s3"], name=f"{p}_s3"),
        ]
        q, s = f"{p}_q3", f"{p}_s3"
        if used != t_in:  # pad with the zero point (a zero frame) or drop unused frames
            if used > t_in:
                pad = const(f"{p}_pads", np.array([0, 0, 0, 0, used - t_in, 0], np.int64))
                out += [
                    helper.make_node("Pad", [q, pad, zp], [f"{p}_qpad"], name=f"{p}_qpad"),
                    helper.make_node(
                        "Pad",
                        [s, pad, const(f"{p}_one", np.float32(1.0))],
                        [f"{p}_spad"],
                        name=f"{p}_spad",
                    ),
                ]
            else:
                start = const(f"{p}_trim_start", np.array([0], np.int64))
                end = const(f"{p}_trim_end", np.array([used], np.int64))
                out += [
                    helper.make_node(
                        "Slice", [q, start, end, axis1], [f"{p}_qpad"], name=f"{p}_qt"
                    ),
                    helper.make_node(
                        "Slice", [s, start, end, axis1], [f"{p}_spad"], name=f"{p}_st"
                    ),
                ]
            q, s = f"{p}_qpad", f"{p}_spad"
        grouped = const(f"{p}_grouped", np.array([-1, pairs, stride * c_in], np.int64))
        grouped_scale = const(f"{p}_grouped_scale", np.array([-1, pairs, stride], np.int64))
        out += [
            helper.make_node("Reshape", [q, grouped], [f"{p}_qg"], name=f"{p}_qg"),
            helper.make_node("Reshape", [s, grouped_scale], [f"{p}_sg"], name=f"{p}_sg"),
        ]
        taps = []
        for k in range(kernel):
            offset, slot = divmod(k, stride)
            w = weight[:, :, k].T  # [c_in, c_out]
            w_scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / WEIGHT_LEVELS
            w_q = np.clip(np.round(w / w_scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
            qs = const(f"{p}_t{k}_qs", np.array([offset, slot * c_in], np.int64))
            qe = const(f"{p}_t{k}_qe", np.array([offset + t_out, slot * c_in + c_in], np.int64))
            ss = const(f"{p}_t{k}_ss", np.array([offset, slot], np.int64))
            se = const(f"{p}_t{k}_se", np.array([offset + t_out, slot + 1], np.int64))
            wq = const(f"{p}_t{k}_w", w_q)
            ws = const(f"{p}_t{k}_wscale", w_scale.astype(np.float32))
            t = f"{p}_t{k}"
            out += [
                helper.make_node("Slice", [f"{p}_qg", qs, qe, axes12], [f"{t}_q"], name=f"{t}_q"),
                helper.make_node("Slice", [f"{p}_sg", ss, se, axes12], [f"{t}_s"], name=f"{t}_s"),
                helper.make_node(
                    "MatMulInteger", [f"{t}_q", wq, zp, wzp], [f"{t}_acc"], name=f"{t}_gemm"
                ),
                helper.make_node(
                    "Cast", [f"{t}_acc"], [f"{t}_accf"], to=TensorProto.FLOAT, name=f"{t}_cast"
                ),
                helper.make_node("Mul", [f"{t}_s", ws], [f"{t}_rs"], name=f"{t}_rs"),
                helper.make_node("Mul", [f"{t}_accf", f"{t}_rs"], [f"{t}_y"], name=f"{t}_y"),
            ]
            taps.append(f"{t}_y")
        result = node.output[0]
        if len(node.input) > 2 and node.input[2]:
            out.append(helper.make_node("Sum", taps, [f"{p}_nobias"], name=f"{p}_sum"))
            out.append(
                helper.make_node("Add", [f"{p}_nobias", node.input[2]], [result], name=f"{p}_bias")
            )
        else:
            out.append(helper.make_node("Sum", taps, [result], name=f"{p}_sum"))
        replaced[node.name] = out

    # The exported graph moves to [batch, time, channels] after the last conv's activation.
    last_conv = by_name[feature_convs[last]]
    activation = consumers.get(last_conv.output[0], [])
    after = consumers.get(activation[0].output[0], []) if len(activation) == 1 else []
    to_btc = len(after) == 1 and after[0].op_type == "Transpose"
    if not to_btc or list(_attr(after[0], "perm", [])) != [0, 2, 1]:
        raise ExportError(
            f"per-frame INT8 convs: {last_conv.name}'s activation is not followed by the "
            "Transpose to [batch, time, channels] it expects"
        )
    transpose_out = after[0]  # already [batch, time, channels]: an Identity, which ORT removes
    transpose_out.op_type = "Identity"
    del transpose_out.attribute[:]

    rebuilt: list[Any] = []
    for node in nodes:
        if node is first:
            rebuilt.append(transpose_in)
        rebuilt.extend(replaced.get(node.name, [node]))
    for node in replaced:
        weight_name = by_name[node].input[1]
        if all(c.name in replaced for c in consumers.get(weight_name, [])):
            graph.initializer.remove(inits[weight_name])
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    moved = {by_name[name].output[0] for name in replaced}  # now [batch, time, channels]
    moved |= {c.output[0] for name in moved for c in consumers.get(name, [])}
    for value_info in list(graph.value_info):  # shapes inferred for the old layout
        if value_info.name in moved:
            graph.value_info.remove(value_info)
    return model
