"""Where things are kept and who may write them: atomic files and the checks of an --out,
folder locks, torch.distributed in one place, the C heap's policy for large blocks."""
