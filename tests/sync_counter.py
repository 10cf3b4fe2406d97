"""Counting the aten ops that make a GPU wait for the host (a read of a value, a data-dependent
shape), on any device, with a TorchDispatchMode."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
#: Ops whose result on a GPU needs a device-to-host copy before the host can go on.
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default, aten.unique_consecutive.default,
           aten._unique2.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...``; ``c.count`` host syncs, ``c.ops`` their names."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @property
    def count(self):
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket
        if func in SYNCING or (name in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args)):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
