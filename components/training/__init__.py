"""Training engine: one loop for every baseline (checkpoint/resume, AMP, DDP, logging)."""

from components.training.checkpoint import CheckpointError, CheckpointManager, load_training_state
from components.training.engine import (
    FitResult,
    NonFiniteLossError,
    Progress,
    StepContext,
    Trainer,
    TrainerConfig,
    TrainingRoutine,
)
from components.training.loggers import InMemoryLogger, NullLogger, RunLogger

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "FitResult",
    "InMemoryLogger",
    "NonFiniteLossError",
    "NullLogger",
    "Progress",
    "RunLogger",
    "StepContext",
    "Trainer",
    "TrainerConfig",
    "TrainingRoutine",
    "load_training_state",
]
