"""A model as a Hugging Face GPT-2 folder, and the validation documents as text for lm-evaluation-harness.

    python -m model.export --model checkpoints/final.pt --out results/hf     # any .pt, HF folder or hub id
    snakemake --cores 2 export                                              # {results_dir}/hf and lm_eval/

The folder loads offline, from disk only, with `GPT2LMHeadModel.from_pretrained(dir, local_files_only=True)` and
`AutoTokenizer.from_pretrained(dir, local_files_only=True)`:

    config.json              GPT2LMHeadModel's config for [architecture] (model/hf.py)
    model.safetensors        the weights in GPT2LMHeadModel's layout (model/hf.py)
    generation_config.json   <|endoftext|> as bos/eos, and [inference]'s method as generate()'s defaults
    vocab.json, merges.txt   GPT-2's tokenizer, built from the shipped BPE ranks (pipeline/gpt2.tiktoken)
    tokenizer.json           the same tokenizer in the `tokenizers` library's format
    tokenizer_config.json, special_tokens_map.json
    export.json              where it came from: source model, step, tokens, run, [train] settings

The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from pipeline.config import EOT, PILE_SET_NAMES, as_plain_dict
from pipeline.io import atomic_output, log_file, write_json
from pipeline.tokenizer import ENDOFTEXT, RANKS_SHA256, load_ranks

EXPORT_FORMAT = "gpt2-pile-hf-export/1"


# ---------------------------------------------------------------------------------------------------------
# The tokenizer files

@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (encoder.py in OpenAI's release): the 188 printable bytes stand
    for themselves, the other 68 for chr(256 + n), so that every token is a string with no spaces or control
    characters (a space becomes 'Ġ'). vocab.json and merges.txt spell tokens in these characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that made `token`: byte-level BPE on its bytes with the merges of lower rank only stops at
    exactly two parts, the pair whose merge is this token's rank (tiktoken ranks are merge order)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
        if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {rank} ({token!r}) is not the merge of two earlier tokens: the ranks are not BPE ranks")
    return parts[0], parts[1]


@functools.cache
def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json's {token string: id} (<|endoftext|> included) and merges.txt's 50,000 "left right" lines,
    in merge order: GPT-2's own files, derived from the ranks (which are GPT-2's ids)."""
    ranks = load_ranks()
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) > 1:
            left, right = _split_in_two(token, rank, ranks)
            merges.append(f"{spell(left)} {spell(right)}")
    vocab[ENDOFTEXT] = EOT
    return vocab, merges


def tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """GPT-2's tokenizer in the `tokenizers` library's format: byte-level pre-tokenizer (GPT-2's regex, no
    prefix space), BPE without unknown token, byte-level decoder; <|endoftext|> a special token."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT, "content": ENDOFTEXT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_files(model_max_length: int) -> dict[str, str]:
    """{file name: text} of GPT-2's tokenizer: vocab.json, merges.txt, tokenizer.json and its configs."""
    vocab, merges = gpt2_vocab_and_merges()
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {**special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
              # True would rewrite decoded text (" ." -> "."): decoding must give back the bytes
              "clean_up_tokenization_spaces": False}
    return {
        "vocab.json": _json(vocab),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": _json(tokenizer_json(vocab, merges)),
        "tokenizer_config.json": _json(config, indent=2),
        "special_tokens_map.json": _json(special, indent=2),
    }


def _json(obj, indent=None) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The folder

def generation_config(inference: dict | None) -> dict:
    """generation_config.json: <|endoftext|> as bos/eos, and [inference] (if given) as generate()'s defaults."""
    out = {"bos_token_id": EOT, "eos_token_id": EOT}
    if not inference:
        return out
    out["max_new_tokens"] = inference["how_many_tokens_to_generate"]
    method = inference["inference_method"]
    if method == "beam_search":
        out.update(do_sample=False, num_beams=inference["beam_size"], length_penalty=inference["length_penalty"])
    elif method == "sampling":
        # top_k 0 written out: transformers' default would otherwise cut sampling to the 50 likeliest tokens
        out.update(do_sample=True, temperature=inference["temperature"], top_k=inference["top_k"],
                   top_p=inference["top_p"])
    else:
        out.update(do_sample=False, num_beams=1)
    return out


def export_model(model, arch, out_dir, meta: dict | None = None, inference: dict | None = None) -> Path:
    """Write `model` (our GPT) as a Hugging Face GPT-2 folder at out_dir, atomically; returns out_dir."""
    from model.hf import hf_config, save_hf_weights

    meta = meta or {}
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    config = hf_config(arch, P_drop=float(train.get("P_drop", 0.1)),
                       attention_dropout=bool(train.get("attention_dropout", True)),
                       init_std=float(train.get("init_std", 0.02)))
    provenance = {"format": EXPORT_FORMAT, "source": meta.get("hub_id") or meta.get("path"),
                  "architecture": as_plain_dict(arch), "tokenizer_ranks_sha256": RANKS_SHA256,
                  **{k: meta[k] for k in ("step", "tokens", "run_dir") if k in meta}}
    if train:  # the settings, not this machine's folders: the folder may be published
        provenance["train"] = {k: v for k, v in train.items() if not k.startswith(("folder_", "path_"))}
    out_dir = Path(out_dir)
    with atomic_output(out_dir, is_dir=True) as tmp:
        save_hf_weights(model, tmp / "model.safetensors")
        files = {"config.json": _json(config, indent=2),
                 "generation_config.json": _json(generation_config(inference), indent=2),
                 "export.json": json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n",
                 **tokenizer_files(arch.positional_encoding_max_pos)}
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def run(model_path, out_dir, inference: dict | None = None, log=None) -> Path:
    """The export stage: the model file (or folder) at model_path -> the Hugging Face folder out_dir."""
    from model.checkpoint import load_gpt

    with log_file(log) as logfh:
        model, arch, meta = load_gpt(model_path, map_location="cpu")
        export_model(model, arch, out_dir, meta, inference)
        print(f"{model_path} ({arch}, step {meta.get('step')}) -> {out_dir}: Hugging Face GPT2LMHeadModel",
              file=logfh)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------------
# The validation documents as text, for lm-evaluation-harness (eval/pile_gpt2_val.yaml)

def _complete_utf8(data: bytes) -> tuple[str, int]:
    """The text of a document's bytes, and how many bytes of a character cut by max_len_tokens were dropped
    from its end (0 to 3): the tokens are a prefix of a valid UTF-8 text, so only the last character can be
    incomplete."""
    for cut in range(4):
        try:
            return data[:len(data) - cut].decode("utf-8"), cut
        except UnicodeDecodeError:
            continue
    raise ValueError("a validation document's tokens do not decode as UTF-8 (a corrupt shard?)")


def write_lm_eval_docs(val_shard, out_jsonl, manifest, log=None) -> dict:
    """One JSON line per validation document: {"text", "pile_set_name", "tokens"}, the text being exactly the
    tokens the workflow scores (after <|endoftext|>), decoded; the manifest counts what lm-eval will see."""
    import orjson

    from pipeline.shards import ShardReader
    from pipeline.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    counts = {"documents": 0, "tokens": 0, "bytes": 0, "words": 0, "documents_reencoded_identically": 0,
              "documents_cut_mid_character": 0}
    with log_file(log) as logfh, atomic_output(out_jsonl) as tmp, open(tmp, "wb") as fh:
        for batch in ShardReader(val_shard):
            for j in range(batch.n_docs):
                ids = batch.tokens[j, 1:].tolist()
                data = enc.decode_bytes(ids)
                text, cut = _complete_utf8(data)
                fh.write(orjson.dumps({"text": text, "pile_set_name": PILE_SET_NAMES[int(batch.pile_set[j])],
                                       "tokens": len(ids)}) + b"\n")
                counts["documents"] += 1
                counts["tokens"] += len(ids)
                counts["bytes"] += len(data) - cut
                counts["words"] += len(text.split())
                counts["documents_cut_mid_character"] += cut > 0
                counts["documents_reencoded_identically"] += enc.encode_ordinary(text) == ids
        print(f"{val_shard} -> {out_jsonl}: {counts}", file=logfh)
    doc = {"val_split": str(val_shard), "docs": str(out_jsonl), **counts,
           "note": "text = the decoded tokens after <|endoftext|>, i.e. the documents as cut to max_len_tokens; "
                   "re-encoding a text can differ from the shard's tokens where the cut split a word or a "
                   "character (documents_reencoded_identically counts the texts that give the same tokens again)"}
    write_json(manifest, doc)
    return doc


def main(argv=None) -> int:
    from model.checkpoint import ModelFileError
    from pipeline.config import ConfigError, load_settings

    p = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model file (.pt), Hugging Face folder, or hub id in the local cache")
    p.add_argument("--out", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--ini", default="config.ini",
                   help="config whose [inference] becomes generation_config.json (default: config.ini, if present)")
    args = p.parse_args(argv)
    try:
        inference = None
        if Path(args.ini).is_file():
            inference = as_plain_dict(load_settings(args.ini).inference)
        run(args.model, args.out, inference)
    except (ConfigError, ModelFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: load it with GPT2LMHeadModel.from_pretrained({str(args.out)!r}, local_files_only=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
