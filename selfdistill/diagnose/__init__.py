"""`sdft diagnose`: why SDFT does or does not learn a task, measured before training.

For a model, a task and a teacher template, on a sample of records:
- the teacher ceiling (greedy accuracy without and with the demonstration, and the
  demonstration log-likelihood gain), from `selfdistill.tasks.ceiling`;
- along the student's own sampled completions, per position: the student's and the teacher's
  probability of the sampled token, the per-token divergence training would minimise, and both
  models' top tokens (`core`);
- a summary and advice derived from it (`summary`), written as diagnose.json and a
  self-contained diagnose.html (`report`). See docs/diagnose.md.
"""

from selfdistill.diagnose.core import CompletionTrace, RecordTrace, is_format_token, trace
from selfdistill.diagnose.summary import advice, summarize

__all__ = ["CompletionTrace", "RecordTrace", "is_format_token", "trace", "advice", "summarize"]
