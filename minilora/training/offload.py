"""Offload the activations that gradient checkpointing keeps (each recomputed layer's input) to
pinned host memory, copied on a side CUDA stream, and bring them back when backward needs them.

With checkpointing on, what stays on the GPU between forward and backward is one hidden-state
tensor per decoder layer, (B, T, H): for Phi-3-mini at 8 x 2048 tokens that is 32 x 96 MB in bf16.
Offloaded, those bytes live in host memory; the copies overlap with compute on their own stream.
"""

import torch


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least `min_numel` elements on `devices` leave the device until backward.

    On CUDA the copy goes to pinned memory on a side stream. A CPU tensor (only when "cpu" is in
    `devices`, as in tests) is copied to a fresh host tensor, which exercises the same pack/unpack.
    """

    def __init__(self, devices: tuple[str, ...] = ("cuda",), min_numel: int = 1 << 16):
        self.devices, self.min_numel = devices, min_numel
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.device.type not in self.devices or t.numel() < self.min_numel:
            return t
        if not t.is_cuda:
            return (t.device, t.detach().clone(), None)
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy ends
        return (t.device, host, done)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        if done is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(done)  # the host copy is complete
        return host.to(device, non_blocking=True)
