"""Cluster membership: what a node brings to the Ray cluster (its NPUs) and how it joins."""
