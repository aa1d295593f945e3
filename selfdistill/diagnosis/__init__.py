"""Diagnosis (`sdft diagnose`, `selfdistill.diagnose`): why SDFT does or does not learn a task, measured before training.

For a model, a task and a teacher template, on a sample of records:
- the teacher ceiling (greedy accuracy without and with the demonstration, and the
  demonstration log-likelihood gain), from `selfdistill.eval.ceiling`;
- along the student's own sampled completions, per position: the student's and the teacher's
  probability of the sampled token, the per-token divergence training would minimise, and both
  models' top tokens (`core`);
- a summary and advice derived from it (`summary`), written as diagnose.json and a
  self-contained diagnose.html (`report`). See docs/diagnose.md.

The package is named `diagnosis`, not `diagnose`, so that `selfdistill.diagnose` is only ever the API
function (as `selfdistill.plan` is the function and `selfdistill.memory_plan` the package).
"""

from selfdistill.diagnosis.core import CompletionTrace, RecordTrace, is_format_token, trace
from selfdistill.diagnosis.summary import advice, summarize

__all__ = ["CompletionTrace", "RecordTrace", "is_format_token", "trace", "advice", "summarize"]
