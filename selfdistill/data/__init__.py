"""Records, their loading and validation, and the student / teacher prompts built from them."""

from selfdistill.data.prompts import TEACHER_TEMPLATES, PromptBuilder
from selfdistill.data.records import Record, load_records, records_from_rows

__all__ = ["Record", "load_records", "records_from_rows", "PromptBuilder", "TEACHER_TEMPLATES"]
