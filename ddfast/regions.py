"""Linear regions of piecewise-linear models, read off the autograd graph of a forward.

A model built from affine ops (linear and convolution layers, sums, reshapes, average pooling,
batch norm in eval mode) and piecewise-linear ones (ReLU, leaky ReLU, threshold, max pooling)
is affine around every input, and its input Jacobian depends on the input only through the
*activation pattern*: which units are active, which input each max-pool window picks. Two
inputs with the same pattern have the same Jacobian, exactly.

DeepFool's iterates often stay in their region: a step that the clip to the input bounds cut
short leaves most units as they were. :func:`activation_pattern` reads the pattern from the
graph that the attack's forward builds anyway (the tensors ReLU and max-pool save for their
backward), so the attack reuses a sample's Jacobian rows while its pattern does not change.
It returns None, and the attack computes every Jacobian, wherever the graph between the input
and the logits holds an op whose Jacobian could depend on the input in another way (tanh,
softmax, ``x * x``, a custom autograd Function, an op this module does not know).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["activation_pattern", "same_pattern"]

#: Backward nodes of ops that are linear in all their inputs together (sums, reshapes, pooling
#: by averages, copies): any of their inputs may depend on x.
_LINEAR = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "NegBackward0", "MulBackward1", "DivBackward1", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "AliasBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "ExpandBackward0", "CloneBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "SqueezeBackward3", "UnsqueezeBackward0", "CatBackward0", "StackBackward0",
    "SliceBackward0", "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "IndexSelectBackward0", "FlipBackward0", "RepeatBackward0", "ConstantPadNdBackward0",
    "SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1", "AvgPool2DBackward0",
    "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0", "ToCopyBackward0",
})

#: Backward nodes of products: linear in x when at most one of the listed inputs (positions in
#: next_functions) depends on x; the other positions (a bias) may depend on it freely.
_PRODUCTS = {
    "MulBackward0": (0, 1), "MmBackward0": (0, 1), "BmmBackward0": (0, 1),
    "AddmmBackward0": (1, 2), "ConvolutionBackward0": (0, 1),
}


def _pattern_of(node, name: str) -> Optional[Tensor]:
    """The per-element pattern a piecewise-linear node's backward depends on, or None when the
    node is not one of those."""
    if name == "ReluBackward0":
        return node._saved_result > 0
    if name == "ThresholdBackward0":
        return node._saved_self > node._saved_threshold
    if name == "LeakyReluBackward0":
        return node._saved_self > 0
    if name in ("MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0"):
        return node._saved_result1
    return None


def _affine_given_pattern(node, name: str, x_dep: Sequence[bool]) -> bool:
    """Whether the node's Jacobian w.r.t. its x-dependent inputs is constant (given nothing, or
    given the pattern that :func:`_pattern_of` records)."""
    if name in _LINEAR:
        return True
    if name in _PRODUCTS:
        return sum(x_dep[i] for i in _PRODUCTS[name] if i < len(x_dep)) <= 1
    if name == "DivBackward0":           # a / b: linear in a while b does not depend on x
        return len(x_dep) < 2 or not x_dep[1]
    if name == "NativeBatchNormBackward0":   # eval mode: an affine map with the running statistics
        return not node._saved_training and not any(x_dep[1:])
    return False


def activation_pattern(logits: Tensor, x: Tensor) -> Optional[List[Tensor]]:
    """The activation pattern of every sample of a batch, from the graph of ``logits`` [n, K]
    back to the leaf ``x`` [n, ...] they were computed from.

    Returns a list of tensors, each [n, ...] (bool masks of active units, int64 max-pool
    indices), such that two samples with equal entries lie in one linear region of the model:
    their Jacobians ``d logits / d x`` are equal. None when the model is not certified
    piecewise-linear between x and the logits (see the module docstring), or when a recorded
    tensor does not have the batch as its first dim.
    """
    root = logits.grad_fn
    if root is None or not x.requires_grad:
        return None
    n = logits.shape[0]
    # Post-order over the graph (iterative: deep models), then, children first, which nodes
    # depend on x: only those need to be affine given the pattern.
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((child, False) for child, _ in node.next_functions if child is not None and child not in seen)
    depends = {}
    patterns = []
    for node in order:
        if type(node).__name__ == "AccumulateGrad":
            depends[node] = node.variable is x
            continue
        x_dep = [child is not None and depends.get(child, False) for child, _ in node.next_functions]
        depends[node] = any(x_dep)
        if not depends[node]:
            continue
        name = type(node).__name__
        pattern = _pattern_of(node, name)
        if pattern is not None:
            if pattern.dim() == 0 or pattern.shape[0] != n:
                return None
            patterns.append(pattern.reshape(n, -1))
        elif not _affine_given_pattern(node, name, x_dep):
            return None
    if not depends.get(root, False):
        return None
    return patterns


def same_pattern(a: Sequence[Tensor], b: Sequence[Tensor], n: int, device: torch.device) -> Tensor:
    """[n] bool: the samples whose entries agree in two patterns from :func:`activation_pattern`
    (one model, n samples each; an affine model has no entries: one region)."""
    same = torch.ones(n, dtype=torch.bool, device=device)
    for p, q in zip(a, b):
        same &= (p == q).all(1)
    return same
