"""Continued pre-training: next-token loss on raw documents (for knowledge tasks).

Documents come from `data.documents` (a .jsonl with a `text` field, or a .txt file whose
documents are separated by blank lines) or, when unset, from the records' `context` fields.
Long documents are split into pieces of at most `data.max_prompt_tokens` tokens rather than
truncated, so no text is silently dropped.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.data.records import read_jsonl
from selfdistill.errors import UserError
from selfdistill.methods.base import TrainItem
from selfdistill.methods.sft import SFT
from selfdistill.registry import MethodInfo, Step


def load_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        for number, row in read_jsonl(path, origin="data.documents"):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(
                    f"{path} line {number}, field 'text': missing or empty (each line needs the document text)."
                )
            docs.append(text)
    else:
        try:
            docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        except FileNotFoundError:
            raise UserError(f"{path}: file not found (data.documents).") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 (data.documents).") from None
    if not docs:
        raise UserError(f"{path}: no documents (data.documents).")
    return docs


class CPT(SFT):
    """SFT's loss on pieces of raw documents instead of demonstrations."""

    @classmethod
    def check_inputs(cls, cfg) -> None:
        if cfg.data.documents:
            load_documents(cfg.data.documents)

    def training_examples(self, records):
        if self.cfg.data.documents:
            docs = load_documents(self.cfg.data.documents)
        else:
            docs = list(dict.fromkeys(r.context for r in (self.records or []) if r.context))
            if not docs:
                raise UserError("cpt needs documents: set data.documents, or give the records a 'context' field.")
        piece = max(2, self.cfg.data.max_prompt_tokens)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        pieces = []
        for doc in docs:
            ids = bos + self.tokenizer.encode(doc, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            pieces.extend(ids[i : i + piece] for i in range(0, len(ids) - 1, piece - 1))
        return [p for p in pieces if len(p) >= 2]

    def build_items(self, pieces, seeds, step):
        # The first token is the context; every following token is predicted.
        return [TrainItem(record_index=-1, prompt_ids=p[:1], completion=p[1:]) for p in pieces], {}


METHOD = MethodInfo(
    "cpt",
    "Continued pre-training: next-token loss on raw documents (data.documents, or the records' context).",
    CPT,
    "Continued pre-training: trained with the next-token loss on raw documents.",
    settings=("data.documents",),
    step=Step(trains_on="documents"),
)
