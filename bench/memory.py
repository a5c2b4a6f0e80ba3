"""Peak bytes of the tensors a block of PyTorch code allocates, on any device, CPU included.

PyTorch keeps no allocator statistics for the CPU, and `tracemalloc` does not see its allocations, so this counts
tensors instead: a TorchDispatchMode sees the output of every ATen operator, forward and backward, and a weak
reference to each output notices when it is freed (PyTorch keeps a tensor's Python object alive as long as its
storage is referenced from C++, e.g. saved for backward). Views share their base's storage and count once.
Tensors created before the block (its inputs, the weights) are not counted unless handed to `hold`; the gradients
it creates are.
"""
import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Use as `with TensorMemoryTracker() as tracker: ...`; then `tracker.peak_bytes` is the largest number of
    bytes held at once by tensors allocated inside the block, and `tracker.live_bytes` what is still held."""

    def __init__(self):
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self._references: Dict[int, int] = {}  # storage address -> live tensors using it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for tensor in _tensors(output):
            self._track(tensor, inputs)
        return output

    def hold(self, tensors) -> None:
        """Counts these tensors from before the block (a model's weights) too, until they are freed. Weights built
        inside the block would not count: a module wraps each new tensor in an nn.Parameter, a new Python object,
        and the tensor the operator returned is freed at once."""
        for tensor in tensors:
            self._track(tensor, set())

    def _track(self, tensor: torch.Tensor, input_addresses: set) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self._references:
            if address in input_addresses:
                return  # a view of (or in-place result on) a tensor from before the block: nothing was allocated
            self._references[address] = 0
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._references[address] += 1
        weakref.finalize(tensor, self._release, address, storage.nbytes())

    def _release(self, address: int, nbytes: int) -> None:
        self._references[address] -= 1
        if self._references[address] == 0:
            del self._references[address]
            self.live_bytes -= nbytes


def _tensors(tree) -> list:
    """The tensors anywhere in an operator's arguments or output (nested tuples, lists and dicts)."""
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
