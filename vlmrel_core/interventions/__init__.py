"""Causal checks on one model: zero or mean-ablate probe dimensions, grey the most/least attended patches, and
measure the accuracy and confidence effect with paired CIs (per-call hooks, like capture)."""
