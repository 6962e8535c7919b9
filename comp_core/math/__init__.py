"""The math of pruning, as pure functions over tensors: least squares and its damping (``linalg``), the mask
solves for every prefix of a dense's inputs (``mask_tuning``), neuron scores (``scoring``), per-layer ratio
allocation (``allocation``), the OBS solvers of SparseGPT and APT (``obs_solvers``), RIA's channel permutation
(``permutation``), sparsity patterns (``sparsity``) and Prune&Comp's stream scale for removed blocks
(``magnitude``).

Nothing here knows a model: no import from ``models``, the block loop, ``methods`` or a face (the import
contract in pyproject.toml).
"""
