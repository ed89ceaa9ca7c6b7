"""``CUDAGraphCache``: replay a fixed-shape function of CUDA tensors from CUDA graphs, one graph per input signature.

IoU-Net's refinement is dozens of tiny kernels per step on ~100 boxes: launched one by one from Python it costs
~10 ms of host time for well under 1 ms of GPU work. Replayed from a CUDA graph it costs the GPU work.
"""

import logging
import warnings
from collections import OrderedDict
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["CUDAGraphCache"]

logger = logging.getLogger(__name__)

# Signatures remembered (seen once, not captured) before the oldest are forgotten.
_MAX_SEEN = 1024


class _Entry:
    def __init__(self, graph: "torch.cuda.CUDAGraph", inputs: List[Tensor], outputs: Tuple[Tensor, ...]):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs


class CUDAGraphCache:
    """Runs ``fn(*tensors) -> tuple of tensors`` from CUDA graphs, one per signature: the inputs' shapes, dtypes and
    device plus the caller's ``key``, which must name everything else ``fn`` bakes in (the function itself, Python
    scalars, the addresses of the parameters it reads).

    A signature is run eagerly the first time it is seen and captured the second time (a one-off signature, such as
    an image size seen once, is not worth a capture); at most ``max_graphs`` graphs are kept, the least recently used
    dropped. Each call copies the inputs into the graph's own buffers, replays it and returns clones of its outputs,
    so results never alias a later call's. If a capture fails, that signature runs eagerly from then on (one warning).

    ``fn`` must be capturable: CUDA tensors only, no host synchronisation, shapes that depend on the input shapes
    alone, and no state read from the host that the key does not name. Gradients may be taken inside ``fn``
    (``torch.autograd.grad``); it runs outside inference mode on buffers that are not inference tensors.
    """

    def __init__(self, max_graphs: int = 8):
        if max_graphs < 0:
            raise ValueError(f"CUDAGraphCache: max_graphs must be >= 0, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._seen: "OrderedDict[Hashable, None]" = OrderedDict()
        self._failed = set()

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo) -> "CUDAGraphCache":
        return CUDAGraphCache(self.max_graphs)  # graphs belong to the original's parameters: a copy starts empty

    def __getstate__(self):
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state):
        self.__init__(state["max_graphs"])

    def clear(self) -> None:
        """Forget every graph (and the memory they hold) and every signature seen."""
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()

    def __call__(
        self, fn: Callable[..., Tuple[Tensor, ...]], tensors: Sequence[Tensor], key: Hashable
    ) -> Tuple[Tensor, ...]:
        """``fn(*tensors)``, from a graph of this signature if there is one (capturing it if due)."""
        signature = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        entry = self._graphs.get(signature)
        if entry is None:
            if not self._should_capture(signature, tensors):
                return self.eager(fn, tensors)
            entry = self._capture(fn, signature, tensors)
            if entry is None:
                return self.eager(fn, tensors)
        self._graphs.move_to_end(signature)
        with torch.inference_mode(False), torch.no_grad():
            for dst, src in zip(entry.inputs, tensors):
                dst.copy_(src)
        entry.graph.replay()
        return tuple(out.clone() for out in entry.outputs)

    def _should_capture(self, signature, tensors: Sequence[Tensor]) -> bool:
        if self.max_graphs == 0 or signature in self._failed or not tensors:
            return False
        if not all(t.is_cuda and t.device == tensors[0].device for t in tensors):
            return False
        if signature not in self._seen:
            self._seen[signature] = None
            if len(self._seen) > _MAX_SEEN:
                self._seen.popitem(last=False)
            return False
        return True

    @staticmethod
    def eager(fn: Callable[..., Tuple[Tensor, ...]], tensors: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """``fn(*tensors)`` run as it is, outside inference mode (inference tensors are copied first)."""
        with torch.inference_mode(False):
            return tuple(fn(*[t.clone() if t.is_inference() else t for t in tensors]))

    def _capture(self, fn, signature, tensors: Sequence[Tensor]) -> Optional[_Entry]:
        device = tensors[0].device
        try:
            with torch.cuda.device(device), torch.inference_mode(False):
                inputs = [t.clone() for t in tensors]  # the graph's own buffers, outside inference mode
                # Warm up on a side stream (cuBLAS workspaces, autograd's device thread), as torch's docs advise.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    fn(*inputs)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = tuple(fn(*inputs))
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eagerly
            self._failed.add(signature)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", RuntimeWarning)
            return None
        entry = _Entry(graph, inputs, outputs)
        self._graphs[signature] = entry
        self._seen.pop(signature, None)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        logger.debug("captured a CUDA graph of %s for %s (%d kept)", fn, signature, len(self._graphs))
        return entry
