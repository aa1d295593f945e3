"""A model that keeps learning: a workspace of demonstrations, rounds, a gate and versions."""

from selfdistill.learner.workspace import Learner, LearnerSettings, RoundResult

__all__ = ["Learner", "LearnerSettings", "RoundResult"]
