"""Linear regions of piecewise-linear models, read off the autograd graph of a forward.

A model built from affine ops (linear and convolution layers, sums, reshapes, average pooling,
padding, upsampling, batch norm in eval mode on CPU: cuDNN's node is not certified) and
piecewise-linear ones (ReLU, leaky ReLU, threshold, hardtanh / ReLU6, clamp, max pooling) is
affine around every input, and its input Jacobian depends on the input only through the
*activation pattern*: which units are active, which input each max-pool window picks. Two
inputs with the same pattern have the same Jacobian, exactly.

DeepFool's iterates often stay in their region: a step that the clip to the input bounds cut
short leaves most units as they were. :func:`activation_pattern` reads the pattern from the
graph that the attack's forward builds anyway (the tensors ReLU and max-pool save for their
backward), so the attack reuses a sample's Jacobian rows while its pattern does not change.

What is certified, node by node on the path from the input to the logits (anything else, and
the attack computes every Jacobian):

* every op is affine in its input-dependent operands or one of the piecewise-linear ops above;
* a product (``*``, ``/``, matmul, convolution) has one input-dependent operand; the other is
  a parameter or buffer of the model (the view of it and its version counter go into the
  region's signature), or a small tensor (<= 4096 elements) whose bytes go into the signature;
  a large tensor computed from the input (a mask, a detached copy, an index) is refused: the
  graph cannot see how it depends on the input;
* every input-dependent tensor has the batch as its first dim, and no op mixes samples
  (reductions, concatenation, selection, transposition or flips over dim 0 are refused);
* the signature -- the ops in graph order, their output sizes past the batch dim, the
  constants they use and their non-tensor settings -- is the same at both points (Python
  control flow that reads the input shows there).

Not seen, so not supported while reuse is on: gradient hooks that depend on the input, and
parameters edited in place through ``.data`` during the forward (edits that bump a tensor's
version counter are seen).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Pattern", "activation_pattern", "same_pattern", "model_constants"]

#: (signature, masks): the signature (compared with ==) holds for the whole batch, each mask [n, ...]
#: per sample (bool active units, uint8 clamp bands, int64 max-pool choices).
Pattern = Tuple[tuple, List[Tensor]]

#: Ops linear in all their input-dependent operands together, acting on each sample alone
#: (given the batch-first and per-op dim checks below).
_LINEAR = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "NegBackward0", "MulBackward1", "DivBackward1", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "AliasBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "ExpandBackward0", "CloneBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "SqueezeBackward3", "UnsqueezeBackward0", "CatBackward0", "StackBackward0",
    "SliceBackward0", "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "FlipBackward0", "SumBackward1", "MeanBackward1", "AvgPool2DBackward0", "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0", "ToCopyBackward0",
    "ConstantPadNdBackward0", "ReflectionPad1DBackward0", "ReflectionPad2DBackward0",
    "ReflectionPad3DBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
    "ReplicationPad3DBackward0", "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0",
    "UpsampleNearest3DBackward0", "UpsampleBilinear2DBackward0", "PixelShuffleBackward0",
    "PixelUnshuffleBackward0",
})
#: Largest tensor operand of a product that is compared by value (bytes) when it is not one of
#: the model's parameters or buffers.
SMALL_CONSTANT = 4096

#: Saved settings naming the dims an op works along: none of them may be the batch dim
#: (a permutation must keep it first).
_DIM_ATTRS = ("_saved_dim", "_saved_dims", "_saved_dim0", "_saved_dim1")

#: Products: {node: {slot the input may enter through: saved constants of the other operands}}.
_PRODUCTS: Dict[str, Dict[int, Tuple[str, ...]]] = {
    "MulBackward0": {0: ("_saved_other",), 1: ("_saved_self",)},
    "DivBackward0": {0: ("_saved_other",)},
    "MmBackward0": {0: ("_saved_mat2",)},
    "AddmmBackward0": {1: ("_saved_mat2",)},
    "ConvolutionBackward0": {0: ("_saved_weight",)},
    "NativeBatchNormBackward0": {0: ("_saved_weight", "_saved_running_mean", "_saved_running_var")},
}
#: Slots of a product that are added (a bias): the input may enter there too.
_ADDED = {"AddmmBackward0": {0}, "ConvolutionBackward0": {2}}

_saved_names: Dict[type, Tuple[str, ...]] = {}


def model_constants(model) -> Optional[FrozenSet[int]]:
    """Storage addresses of an ``nn.Module``'s parameters and buffers (None for another
    callable: nothing can be certified constant then)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return frozenset(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))


def _dims(v, ndim: int) -> Tuple[int, ...]:
    """A saved dim setting as non-negative dims (autograd stores negative dims as unsigned)."""
    vals = v if isinstance(v, (tuple, list)) else (v,)
    out = []
    for d in vals:
        d = int(d)
        if d >= 2 ** 63:
            d -= 2 ** 64
        out.append(d % ndim if ndim else d)
    return tuple(out)


def _settings(node) -> Tuple[list, list]:
    """(non-tensor saved settings as (name, value) pairs, saved tensors as (name, tensor))."""
    names = _saved_names.get(type(node))
    if names is None:
        names = tuple(a for a in dir(node) if a.startswith("_saved_") and "_sym_" not in a)
        _saved_names[type(node)] = names
    settings: list = []
    tensors: list = []
    for a in names:
        v = getattr(node, a)
        (tensors if isinstance(v, Tensor) else settings).append((a, v))
    return settings, tensors


def _constant(t: Optional[Tensor], constants: FrozenSet[int], sig: list) -> bool:
    """Whether a non-input operand can be certified: a view of one of the model's parameters or
    buffers (which view, and its version, join the signature) or a small tensor (its bytes
    join the signature)."""
    if t is None:
        return True
    if t.untyped_storage().data_ptr() in constants:
        sig.append((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version))
        return True
    if t.numel() <= SMALL_CONSTANT:
        flat = t.detach().contiguous().view(-1)
        sig.append((tuple(t.shape), t.dtype, flat.view(torch.uint8).cpu().numpy().tobytes()))
        return True
    return False


def _bands(v: Tensor, lo, hi) -> Tensor:
    """Where each element of v lies against the bounds lo <= hi (either may be None): below,
    at lo, between, at hi, above. Finer than any tie rule of a clamp's derivative."""
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for b in (lo, hi):
        if b is not None:
            code += (v >= b).to(torch.uint8) + (v > b).to(torch.uint8)
    return code


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
    if name == "HardtanhBackward0":
        return _bands(node._saved_self, node._saved_min_val, node._saved_max_val)
    if name == "ClampBackward1":
        return _bands(node._saved_self, node._saved_min, node._saved_max)
    return None


def _post_order(root) -> list:
    """The graph's nodes, children before parents (iterative: deep models)."""
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
    return order


def activation_pattern(logits: Tensor, x: Tensor, constants: Optional[FrozenSet[int]]) -> Optional[Pattern]:
    """The activation pattern of every sample of a batch, from the graph of ``logits`` [n, K]
    back to the leaf ``x`` [n, ...] they were computed from; ``constants`` from
    :func:`model_constants`.

    Returns ``(signature, masks)``: samples of two calls with equal signatures and equal mask
    rows lie in one linear region of the model (their Jacobians ``d logits / d x`` are equal).
    None when that cannot be certified (see the module docstring).
    """
    root = logits.grad_fn
    if root is None or constants is None or not x.requires_grad or logits.dim() != 2:
        return None
    n = logits.shape[0]
    depends: dict = {}
    signature: list = []
    masks: List[Tensor] = []
    try:
        for node in _post_order(root):
            name = type(node).__name__
            if name == "AccumulateGrad":
                depends[node] = node.variable is x
                continue
            x_dep = [child is not None and depends.get(child, False) for child, _ in node.next_functions]
            depends[node] = any(x_dep)
            if not depends[node]:
                continue
            shapes = [m.shape for m in node._input_metadata]           # the op's outputs
            ins = [child._input_metadata[nr].shape for (child, nr), dep in zip(node.next_functions, x_dep) if dep]
            if any(len(s) == 0 or s[0] != n for s in (*shapes, *ins)):
                return None                                               # not batch-first
            settings, tensors = _settings(node)
            signature.append((name, [v for _, v in settings], [tuple(s[1:]) for s in shapes]))
            ndim = len(ins[0])
            for a, v in settings:
                if a in _DIM_ATTRS and v is not None:
                    dims = _dims(v, ndim)
                    if (dims[0] != 0) if name == "PermuteBackward0" else (0 in dims):
                        return None                                       # works along the batch
            pattern = _pattern_of(node, name)
            if pattern is not None:
                masks.append(pattern.reshape(n, -1))
            elif name in _PRODUCTS:
                if name == "NativeBatchNormBackward0" and node._saved_training:
                    return None                                           # batch statistics
                entered = {i for i, d in enumerate(x_dep) if d} - _ADDED.get(name, set())
                if len(entered) > 1 or not entered <= set(_PRODUCTS[name]):
                    return None
                saved = dict(tensors)
                for slot in entered:
                    if not all(_constant(saved.get(c), constants, signature) for c in _PRODUCTS[name][slot]):
                        return None
            elif name not in _LINEAR:
                return None
    except (AttributeError, RuntimeError, TypeError):   # another torch's nodes: certify nothing
        return None
    if not depends.get(root, False):
        return None
    return tuple(signature), masks


def same_pattern(a: Pattern, b: Pattern, n: int, device: torch.device) -> Tensor:
    """[n] bool: the samples that lie in one region in two patterns from
    :func:`activation_pattern` (n samples each)."""
    (sig_a, masks_a), (sig_b, masks_b) = a, b
    if sig_a != sig_b or len(masks_a) != len(masks_b) or any(p.shape != q.shape for p, q in zip(masks_a, masks_b)):
        return torch.zeros(n, dtype=torch.bool, device=device)
    same = torch.ones(n, dtype=torch.bool, device=device)
    for p, q in zip(masks_a, masks_b):
        same &= (p == q).all(1)
    return same
