"""Host -> device transfer of a step's small integer arrays in one copy.

All arrays are packed into one int64 buffer and copied at once, then split into views on the device:
one transfer per step instead of one per array. On CUDA the buffer is pinned and the copy
asynchronous; two buffers alternate, and a buffer is refilled only after the copy that last read it
has finished (its event), so preparing step N+1 never overwrites data step N is still reading.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device, num_buffers: int = 2) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        if self.pinned:
            self._buffers = [torch.empty(0, dtype=torch.int64) for _ in range(num_buffers)]
            self._events = [None] * num_buffers
        self._next = 0

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Each array (any int dtype, 1-D) -> an int64 tensor on the device, in one transfer."""
        return self.to_device_packed(arrays)[1]

    def to_device_packed(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Like ``to_device``, also returning the packed device buffer the tensors are views of."""
        sizes = [int(a.size) for a in arrays]
        total = sum(sizes)
        if not self.pinned:
            packed = np.concatenate([a.astype(np.int64, copy=False).reshape(-1) for a in arrays])
            flat = torch.from_numpy(packed)
            if self.device.type != "cpu":
                flat = flat.to(self.device)
            return flat, list(flat.split(sizes))
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        event = self._events[i]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer is done
        if self._buffers[i].numel() < total:
            self._buffers[i] = torch.empty(max(total, 2 * self._buffers[i].numel()), dtype=torch.int64,
                                           pin_memory=True)  # fmt: skip
        host = self._buffers[i][:total]
        np.concatenate([a.astype(np.int64, copy=False).reshape(-1) for a in arrays], out=host.numpy())
        flat = host.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[i] = ev
        return flat, list(flat.split(sizes))

    def close(self) -> None:
        self._buffers, self._events = [], []
