"""A searched per-layer allocation for every method with per-layer levels (EvoPress-style, ``math.evolution``):
``settings`` (the shared settings), ``database`` (each layer pruned at each level), ``fitness`` (KL divergence
to the original's next-token distribution on held-out sequences), ``run`` (the searched prune)."""
from .settings import ALLOCATIONS, SearchSettings
from .run import SearchSpace, searched_prune

__all__ = ["ALLOCATIONS", "SearchSettings", "SearchSpace", "searched_prune"]
