"""The annotation app: human labels of sampled features, scored against the taxonomy (paper, Fig. 7)."""
