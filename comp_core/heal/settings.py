"""What a heal trains, how long and on what: ``HealSettings``, validated where it is made."""
from __future__ import annotations

from dataclasses import dataclass

HEAL_MODES = ("lora", "full", "norms")
# AdamW's learning rate per mode when none is given: adapters and norms move from zero or one and take a large
# step; all weights of an already good model take a small one
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "full": 3e-5, "norms": 1e-3}


@dataclass
class HealSettings:
    """mode: "lora" (low-rank adapters on every dense of the blocks, merged into the weights at the end), "full"
        (every weight of the blocks; the embeddings and the output head stay as they are) or "norms" (only the
        norms' scales and the biases: PERP, arXiv 2312.15230, the cheapest).
    steps / minutes: the budget (at least one; both: whichever ends first). The learning rate follows a cosine
        from ``learning_rate`` to zero over the budget, after a linear warm-up of ``warmup`` of it.
    batch_size: sequences of the healing text per step (cycled in a seeded order).
    top_k / temperature: the teacher's stored targets (``math.distill``).
    lora_rank / lora_alpha: the adapters' rank and scale (α / r).
    seed: the order of the sequences and the adapters' initialisation."""

    mode: str = "lora"
    steps: int | None = None
    minutes: float | None = None
    learning_rate: float | None = None
    warmup: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 4
    top_k: int = 64
    temperature: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"mode must be one of {HEAL_MODES}, got '{self.mode}'")
        if self.steps is None and self.minutes is None:
            raise ValueError("give a budget: steps and/or minutes")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.minutes is not None and self.minutes < 0:
            raise ValueError(f"minutes must be >= 0, got {self.minutes}")
        for name in ("batch_size", "top_k", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.mode]
