"""ONNX Runtime's Skip norms, split into the residual Add and the norm, and put back afterwards.

``SkipSimplifiedLayerNormalization(x, skip, γ[, β_bias])`` (and ``SkipLayerNormalization``) computes
``s = x + skip (+ bias)`` and returns ``n(s)`` (output 0) and ``s`` (output 3): the residual Add is
inside the norm. ONNX Runtime GenAI's model builder writes every norm after the first this way, so
its graphs have no residual Adds for :func:`~ffnfusion.passes.blocks.find_blocks` to walk.

* :class:`SplitSkipNormsPass` rewrites each into ``s = Add(x, skip)`` (``+ bias``) and the plain norm
  op on ``s`` (``SimplifiedLayerNormalization`` / ``LayerNormalization``, same epsilon), both named
  with :data:`SPLIT_PREFIX` — exactly the same math, now with the residual stream explicit.
* :class:`RestoreSkipNormsPass` fuses every norm whose input is such a tagged Add (or, for a norm
  that was a Skip norm, any residual Add a rewrite put there) back into the Skip norm, so a rewritten
  builder model keeps the builder's conventions (and kernels) where they still apply. Where a rewrite removed the Add (an attention branch dropped) the norm stays a plain norm,
  as the builder's own first layer has it.
"""

from __future__ import annotations

import onnx_ir as ir

from ffnfusion.core.errors import BlockRecognitionError

MICROSOFT = "com.microsoft"
SPLIT_PREFIX = "ffnfusion_skip_split/"
# Skip norm -> (the plain norm it normalises with, its domain, input index of the bias).
SKIP_NORMS = {"SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", "", 3),
              "SkipLayerNormalization": ("LayerNormalization", "", 4)}
PLAIN_TO_SKIP = {plain: skip for skip, (plain, _, _) in SKIP_NORMS.items()}


def has_skip_norms(model: ir.Model) -> bool:
    return any(node.op_type in SKIP_NORMS and node.domain == MICROSOFT for node in ir.traversal.RecursiveGraphIterator(model.graph))


class SplitSkipNormsPass(ir.passes.InPlacePass):
    """``Skip…Norm(x, skip, γ, …)`` → ``Add(x, skip)`` + ``…Norm(sum, γ, …)`` (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type not in SKIP_NORMS or node.domain != MICROSOFT:
                continue
            plain, domain, bias_index = SKIP_NORMS[node.op_type]
            for index in (1, 2):  # mean, inverse std: training outputs, never read in inference graphs
                if len(node.outputs) > index and (node.outputs[index].uses() or node.outputs[index].is_graph_output()):
                    raise BlockRecognitionError(f"{node.name}: output {index} of {node.op_type} is read; cannot split it")
            name = node.name or f"skip_norm_{count}"
            x, skip = node.inputs[0], node.inputs[1]
            add = ir.node("Add", [x, skip], name=f"{SPLIT_PREFIX}{name}/add")
            total = add.outputs[0]
            new = [add]
            bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
            if bias is not None:
                biased = ir.node("Add", [total, bias], name=f"{SPLIT_PREFIX}{name}/bias")
                new.append(biased)
                total = biased.outputs[0]
            norm_inputs = [total, node.inputs[2]]
            if plain == "LayerNormalization" and len(node.inputs) > 3 and node.inputs[3] is not None:
                norm_inputs.append(node.inputs[3])
            epsilon = node.attributes.get("epsilon")
            attributes = {"axis": -1, "epsilon": epsilon.value if epsilon is not None else 1e-5}
            norm = ir.node(plain, norm_inputs, attributes=attributes, domain=domain, name=f"{SPLIT_PREFIX}{name}")
            new.append(norm)
            graph.insert_before(node, new)
            replacements = [(node.outputs[0], norm.outputs[0])]
            if len(node.outputs) > 3 and node.outputs[3] is not None:
                replacements.append((node.outputs[3], total))
            for old, value in replacements:
                value.shape, value.type = old.shape, old.type
                ir.convenience.replace_all_uses_with(old, value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            for old, value in replacements:  # the same names: every load splits the same way
                value.name, old.name = old.name, None
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))


class RestoreSkipNormsPass(ir.passes.InPlacePass):
    """Fuse each plain norm that reads a :class:`SplitSkipNormsPass` Add back into its Skip norm."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for norm in list(graph):
            if norm.op_type not in PLAIN_TO_SKIP or norm.domain not in ("", "ai.onnx"):
                continue
            add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
            if add is None or add.op_type != "Add" or len(add.inputs) != 2:
                continue
            # A split Add, or (for a norm that was a Skip norm) the residual Add a rewrite put there,
            # e.g. a fused group's: both operands computed, neither a constant.
            was_skip_norm = (norm.name or "").startswith(SPLIT_PREFIX)
            residual = all(v is not None and v.const_value is None and v.producer() is not None for v in add.inputs)
            if not ((add.name or "").startswith(SPLIT_PREFIX) or (was_skip_norm and residual)):
                continue
            bias = None
            if (add.name or "").endswith("/bias"):  # Add(Add(x, skip), bias)
                summed = add.inputs[0]
                bias, add = add.inputs[1], summed.producer() if summed is not None else None
                if add is None or add.op_type != "Add" or not (add.name or "").startswith(SPLIT_PREFIX):
                    continue
            skip_op = PLAIN_TO_SKIP[norm.op_type]
            inputs = [add.inputs[0], add.inputs[1], norm.inputs[1]]
            if skip_op == "SkipLayerNormalization":
                inputs.append(norm.inputs[2] if len(norm.inputs) > 2 else None)
            if bias is not None:
                inputs.append(bias)
            total = norm.inputs[0]
            total_producer = total.producer() if total is not None else None
            assert total is not None and total_producer is not None  # the tagged Add found above
            epsilon = norm.attributes.get("epsilon")
            name = (norm.name or "").removeprefix(SPLIT_PREFIX) or f"{skip_op}_{count}"
            fused = ir.node(skip_op, inputs, attributes={"epsilon": epsilon.value if epsilon is not None else 1e-5},
                            domain=MICROSOFT, num_outputs=4, name=name)
            fused.outputs[1].name = fused.outputs[2].name = None
            graph.insert_before(norm, fused)
            replacements = ((norm.outputs[0], fused.outputs[0]), (total, fused.outputs[3]))
            for old, value in replacements:
                value.shape, value.type = old.shape, old.type
                ir.convenience.replace_all_uses_with(old, value, replace_graph_outputs=True)
            graph.remove([norm, total_producer, *([add] if bias is not None else [])], safe=True)
            for old, value in replacements:
                value.name, old.name = old.name, None
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))
