"""Host syncs counted with a dispatch mode (tests/test_generate.py, test_hscr.py, test_train.py).

A host sync is an op whose result the CPU must wait for: `.item()`, `int(t)`, `bool(t)` (all
`_local_scalar_dense`), `nonzero`, `masked_select`, indexing with a boolean mask, `equal`, ...
On a GPU each one stalls Python until the queue of kernels has drained. `.tolist()` and `.cpu()`
copy without dispatching an op on the CPU: this mode does not see them.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.unique_consecutive,
         aten._unique2, aten.unique_dim, aten.repeat_interleave}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostSyncs(TorchDispatchMode):
    """Counts the ops (by name) that wait for the device, among those dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        # A boolean mask as an index runs nonzero inside the op, where this mode does not see it.
        indices = args[1] if op in INDEXING and len(args) > 1 else ()
        if op in SYNCS or any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            self.ops[op.__name__] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(fn) -> tuple[int, object]:
    with HostSyncs() as mode:
        out = fn()
    return sum(mode.ops.values()), out
