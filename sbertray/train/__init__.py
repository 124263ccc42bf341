"""Fine-tuning: validated pair data (``data``), the Ray Train driver (``run``) and worker loop
(``worker``), the loss (``loss``), evaluation (``evaluation``) and the model card (``card``)."""

from sbertray.train.evaluation import evaluate, evaluate_model
from sbertray.train.run import TrainResult, train

__all__ = ["TrainResult", "evaluate", "evaluate_model", "train"]
