"""The lm-eval task pile_gpt2_val's documents and figures (eval/pile_gpt2_val.yaml).

The documents are the JSON lines that `snakemake export` writes (model/export.py write_lm_eval_docs): the
workflow's validation split, each document's tokens after <|endoftext|> decoded back to text.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS_NAME = Path("lm_eval") / "val.jsonl"


def docs_path(val_docs: str | None = None, pretrained: str | None = None) -> Path:
    """`val_docs` if given, else lm_eval/val.jsonl beside the `pretrained` folder ({results_dir}/hf)."""
    if val_docs:
        path = Path(val_docs)
    elif pretrained and Path(pretrained).is_dir():
        path = Path(pretrained).resolve().parent / DOCS_NAME
    else:
        raise ValueError("pile_gpt2_val: no documents: give --metadata val_docs=PATH (the lm_eval/val.jsonl that "
                         "`snakemake --cores N export` writes), or a local pretrained=FOLDER beside it")
    if not path.is_file():
        raise ValueError(f"pile_gpt2_val: {path}: no such file (run `snakemake --cores N export`, or give "
                         f"--metadata val_docs=PATH)")
    return path


def load_docs(val_docs: str | None = None, pretrained: str | None = None, **_) -> dict:
    """{"validation": Dataset of {"text", "pile_set_name", "tokens"}} from the local JSON lines file."""
    import datasets

    path = docs_path(val_docs, pretrained)
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {"validation": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results) -> dict:
    """Per document: its log-likelihood with the words and UTF-8 bytes it covers; lm-eval sums them into
    word_perplexity = exp(-sum ll / words), byte_perplexity = exp(-sum ll / bytes), bits_per_byte."""
    (loglikelihood,) = results
    words = len(doc["text"].split())  # whitespace-separated words, as the filter stage counts them
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
