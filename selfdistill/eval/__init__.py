"""Evaluation: graders, task scores, prior-capability probes, drift, HumanEval and lm-eval."""

from selfdistill.eval.evaluate import evaluate, pass_at_k, wilson_interval
from selfdistill.eval.graders import get as get_grader

__all__ = ["evaluate", "pass_at_k", "wilson_interval", "get_grader"]
