"""Sequence log-probabilities of pairs: the token layouts (unshared, or each prompt once), the
head that computes log-softmax at the scored positions only, the prefix-sharing decision and the
one pair scorer (scorer.py) that build, train, eval and verify all use."""
