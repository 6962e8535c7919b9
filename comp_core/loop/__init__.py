"""The one block loop and what it measures: capture the calibration inputs of block 0 (``capture``), visit every
block with the input statistics of its denses (``blocks``, ``stats``; Fisher gradients in ``fisher``), and the
cosine layer importances with the iterative removal that COMP and ShortGPT build on (``importance``), and the
angular distance between the inputs of every pair of layers l and l + n, measured by the same capture forward
(``similarity``).

Imports models and math, never a method or a face (the import contract in pyproject.toml).
"""
from .blocks import PROPAGATION, BlockVisit, block_loop

__all__ = ["PROPAGATION", "BlockVisit", "block_loop"]
