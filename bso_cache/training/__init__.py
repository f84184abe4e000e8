"""Training the policy alone from a cache: the loop (train.py), its checkpoints, optimizers,
DDP/FSDP, logged metrics, the C heap policy, the preflight, the memory plan and sweeps."""
