"""Distillation after depth reduction (``ffnfusion heal``): torch student and teacher from the ONNX
files (:mod:`.student`), the local and global stages (:mod:`.distill`), the safe selection and the
write-back into the same graph (:mod:`.heal`)."""

from ffnfusion.runtime.heal.heal import DEFAULT_SOURCES, HealOptions, HealReport, heal, heal_model_file, heal_sources

__all__ = ["DEFAULT_SOURCES", "HealOptions", "HealReport", "heal", "heal_model_file", "heal_sources"]
