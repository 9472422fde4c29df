"""lm-eval's figures for pile_gpt2_val beside the workflow's own, as a Markdown table (standard library only).

    python eval/table.py results-pile        # reads results-pile/perplexity.json, results-pile/lm_eval/manifest.json
                                             # and the newest results-pile/lm_eval/out/**/results_*.json

The two score different positions of the same documents (docs/hf.md): read the table's notes before
comparing numbers across its columns.
"""

import json
import sys
from pathlib import Path


def newest_results(folder: Path) -> Path:
    found = sorted(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{folder}: no lm-eval results_*.json; run lm_eval with --output_path {folder} first")
    return found[-1]


def main(results_dir: str) -> None:
    results = Path(results_dir)
    ours = json.loads((results / "perplexity.json").read_text())
    manifest = json.loads((results / "lm_eval" / "manifest.json").read_text())
    lm_eval_file = newest_results(results / "lm_eval" / "out")
    doc = json.loads(lm_eval_file.read_text())
    lm = doc["results"]["pile_gpt2_val"]
    limit = (doc.get("config") or {}).get("limit")
    overall, start = ours["overall"], ours["start_predicting_from_what_token"]
    print("| figure | positions scored (document of L tokens, t_0 = <\\|endoftext\\|>) | value |")
    print("|---|---|---:|")
    print(f"| workflow perplexity (token-weighted) | {start} ... L-1, final <\\|endoftext\\|> included "
          f"| {overall['perplexity']:,.2f} |")
    print(f"| workflow bits per byte | {start} ... L-1, over the bytes of those targets | {overall['bits_per_byte']:.4f} |")
    print(f"| workflow document-averaged perplexity (the original's) | {start} ... L-2 "
          f"| {overall['document_averaged_perplexity']:,.2f} |")
    print(f"| lm-eval word_perplexity | 0 ... L-2, per whitespace word of the text | {lm['word_perplexity,none']:,.2f} |")
    print(f"| lm-eval byte_perplexity | 0 ... L-2, per UTF-8 byte of the text | {lm['byte_perplexity,none']:.4f} |")
    print(f"| lm-eval bits_per_byte | 0 ... L-2, per UTF-8 byte of the text | {lm['bits_per_byte,none']:.4f} |")
    print()
    print(f"{overall['documents']:,} documents in the workflow's figures; lm-eval: {manifest['documents']:,} "
          f"documents{f' (limit {limit})' if limit else ''}, {manifest['words']:,} words, {manifest['bytes']:,} bytes; "
          f"{manifest['documents_reencoded_identically']:,} texts re-encode to exactly the shard's tokens. "
          f"lm-eval results: {lm_eval_file}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
