"""The over-optimization monitor (Gao et al. 2023): proxy and gold reward against the KL to the starting
policy during training, its history and its plots."""
