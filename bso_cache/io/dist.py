"""torch.distributed in one place: rank, world size, barriers; a no-op for a single process.

Under `torchrun`, WORLD_SIZE > 1 and the default process group is initialised from the
environment (gloo on CPU, nccl on CUDA). Nothing here is home-made communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as td

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not td.is_initialized():
            backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            td.init_process_group(backend=backend)
        return cls(td.get_rank(), td.get_world_size(), local_rank)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as td

            if td.is_initialized():
                td.barrier()  # gloo aborts at exit if a rank leaves while another still talks
                td.destroy_process_group()
