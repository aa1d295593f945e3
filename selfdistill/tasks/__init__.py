"""Built-in learning tasks: deterministic generators of train / evaluation records.

Each task is sized for a CPU run on the embedded 135M model and designed so that the model,
shown the demonstration (teacher prompt), does much better than without it (student prompt):
that gap, the "teacher ceiling", is what SDFT can distil. `get_task(name).make(seed, size)`
returns the splits; the same seed always gives the same records, and the splits share no item.
"""

from selfdistill.tasks.base import Metric, TaskData, TaskSpec, eval_size
from selfdistill.tasks.catalog import get_task, list_tasks, make_task

__all__ = ["Metric", "TaskData", "TaskSpec", "eval_size", "get_task", "list_tasks", "make_task"]
