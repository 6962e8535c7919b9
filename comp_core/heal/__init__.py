"""Healing a pruned model by distillation from the original (offline: the teacher's top-k targets stored once)."""
from .run import HealRecord, heal
from .settings import HEAL_MODES, HealSettings
from .teacher import TeacherTargets, teacher_targets

__all__ = ["HEAL_MODES", "HealRecord", "HealSettings", "TeacherTargets", "heal", "teacher_targets"]
