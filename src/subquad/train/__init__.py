"""Training: ``TrainConfig`` and ``train`` (the loop), atomic safetensors checkpoints."""

from subquad.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from subquad.train.loop import TrainConfig, evaluate, learning_rate, train

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "evaluate",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
