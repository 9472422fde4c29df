"""Which input chunks exist, and which of them training and validation use (read once, at parse time)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, Settings

SUFFIXES = (".jsonl.zst", ".jsonl")


def discover_chunks(folder: str | Path, where: str = "") -> dict[str, Path]:
    """{stem: path} of the *.jsonl and *.jsonl.zst files in `folder`, in chunk_order ('00' ... '29', 'val')."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{where}[preprocessing] path_to_original_data: {folder} is not a folder")
    chunks: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = path.name[: -len(suffix)]
        if stem in chunks:
            raise ConfigError(f"{where}[preprocessing] path_to_original_data: chunk {stem!r} is there twice "
                              f"({chunks[stem].name} and {path.name}); keep one")
        chunks[stem] = path
    if not chunks:
        raise ConfigError(f"{where}[preprocessing] path_to_original_data: {folder} holds no *.jsonl or *.jsonl.zst chunk")
    return dict(sorted(chunks.items(), key=lambda item: chunk_order(item[0])))


def chunk_order(stem: str):
    """Numbered chunks by number ('0', '1', ..., '10': the original's names sort as 00 ... 29), then the rest."""
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def select_chunks(settings: Settings) -> tuple[list[str], str, dict[str, Path]]:
    """(train chunks, val chunk, {chunk: path} of just those): the first num_of_chunks_to_use non-val chunks
    in chunk order."""
    chunks = discover_chunks(settings.preprocessing.path_to_original_data, f"{settings.path} ")
    val = settings.val.data_from_what_chunk_to_use
    if val not in chunks:
        raise ConfigError(f"{settings.path} [val] data_from_what_chunk_to_use: {val!r} is not a chunk of "
                          f"{settings.preprocessing.path_to_original_data} (chunks: {', '.join(chunks)})")
    others = [c for c in chunks if c != val]
    wanted = settings.train.num_of_chunks_to_use
    if wanted > len(others):
        raise ConfigError(f"{settings.path} [train] num_of_chunks_to_use: {wanted}, but "
                          f"{settings.preprocessing.path_to_original_data} has only {len(others)} chunks besides "
                          f"the validation chunk {val!r}: {', '.join(others) or 'none'}")
    train = others[:wanted]
    return train, val, {c: chunks[c] for c in train + [val]}
