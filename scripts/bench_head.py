"""Peak RSS of one bf16 head forward + backward (bso_cache.scoring.head.TargetLogProbs) at gpu_check's
vocabulary and hidden size (151,936 x 896) for N response positions, the softmax too large to keep.

    MALLOC_MMAP_THRESHOLD_=131072 python scripts/bench_head.py 4096

(the threshold makes RSS follow the live tensors). docs/PERFORMANCE.md has the figures.
"""
import resource
import sys
import time

import torch

from bso_cache.scoring.head import TargetLogProbs, default_chunk

torch.manual_seed(0)
n, V, H = int(sys.argv[1]) if len(sys.argv) > 1 else 4096, 151936, 896
h = torch.empty(n, H, dtype=torch.bfloat16).normal_().requires_grad_(True)
w = torch.empty(V, H, dtype=torch.bfloat16).normal_(0, 0.02).requires_grad_(True)
t = torch.randint(0, V, (n,))
g = torch.randn(n)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
out = TargetLogProbs.apply(h, w, None, t, default_chunk(V, "cpu"), 256 << 20)
(out * g).sum().backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"N={n}: peak above the inputs {peak - base:,.0f} MiB (the bf16 weight gradient alone {V*H*2/2**20:,.0f}), {dt:.2f} s")
