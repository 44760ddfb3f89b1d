"""Pure-PyTorch implementations: the executable spec of every op."""
