"""Hugging Face GPT-2 both ways: export and import give transformers' logits, GPT-2's tokenizer ids, identical
tensors on a round trip; a Hugging Face folder is evaluated and sampled from as it is; errors name the file."""

import json
import math
import os

import numpy as np
import orjson
import pytest
import torch
from safetensors.torch import save_file

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing in these tests may download
os.environ["HF_DATASETS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency "
                                   "(requirements-test.txt): the parity tests compare against it")

from model import evaluate, export, generate, hf  # noqa: E402
from model.checkpoint import ModelFileError, load_gpt, save_model  # noqa: E402
from model.gpt import GPT, PADDED_VOCAB_SIZE  # noqa: E402
from pipeline.config import EOT, VOCAB_SIZE, Architecture  # noqa: E402
from pipeline.shards import ShardReader  # noqa: E402
from pipeline.tokenizer import gpt2_encoding  # noqa: E402
from tests.corpus import sample_lines  # noqa: E402
from tests.synthetic import make_split, write_tiny_ini  # noqa: E402

ARCH = Architecture(N=2, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
TOLERANCE = 1e-4  # float32 logits, max abs difference


def hf_gpt2(arch=ARCH, seed=0, std=0.2, **config):
    """A random GPT2LMHeadModel built by transformers (std large enough that logits differ visibly)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_positions=arch.positional_encoding_max_pos,
                                  n_embd=arch.d_model, n_layer=arch.N, n_head=arch.h, n_inner=arch.d_ff,
                                  initializer_range=std, **config)
    return nudged(transformers.GPT2LMHeadModel(cfg).eval())


def our_gpt(arch=ARCH, seed=0):
    torch.manual_seed(seed)
    return nudged(GPT(arch, init_std=0.2).eval())


@torch.no_grad()
def nudged(model):
    """Non-zero biases and LayerNorm parameters, so that a missed one shows."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name:
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(seed=0, batch=3, length=40):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB_SIZE, (batch, length), generator=g)
    idx[:, 0] = EOT
    return idx


def max_abs_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our random GPT, saved as a model file and exported by the CLI to a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("export")
    model = our_gpt()
    save_model(folder / "final.pt", model, ARCH, run_dir="run-test", step=7, tokens=1234,
               train={"P_drop": 0.0, "init_std": 0.02})
    assert export.main(["--model", str(folder / "final.pt"), "--out", str(folder / "hf"),
                        "--ini", str(folder / "none.ini")]) == 0
    return folder, model


# ---------------------------------------------------------------------------------------------------------
# Logits

def text_batch(n=3, length=40):
    """Documents as the workflow feeds them: <|endoftext|> and the first tokens of real texts."""
    enc = gpt2_encoding()
    docs = [[EOT] + enc.encode_ordinary(orjson.loads(line)["text"])[:length - 1] for line in sample_lines("val", n)]
    return torch.tensor(docs)


@pytest.mark.parametrize("batch", ["real text", "random tokens"])
def test_exported_model_gives_our_logits_in_transformers(exported, batch):
    folder, model = exported
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder / "hf").eval()
    idx = text_batch() if batch == "real text" else tokens()
    with torch.no_grad():
        want, got = model(idx), theirs(idx).logits
    assert got.shape == want.shape == (3, 40, VOCAB_SIZE)
    assert max_abs_diff(got, want) < TOLERANCE
    assert want.std() > 1.0  # the logits are far from uniform: a wrong weight could not hide
    assert theirs.transformer.wte.weight.data_ptr() == theirs.lm_head.weight.data_ptr()  # still tied


def test_transformers_model_imported_gives_its_logits(tmp_path):
    theirs = hf_gpt2()
    theirs.save_pretrained(tmp_path / "hf")
    ours, arch, meta = load_gpt(tmp_path / "hf")
    assert arch == ARCH and meta["format"] == "huggingface"
    idx = tokens(1)
    with torch.no_grad():
        assert max_abs_diff(ours(idx), theirs(idx).logits) < TOLERANCE
    assert (ours.transformer.wte.weight[VOCAB_SIZE:] == 0).all()  # the padding rows
    assert ours.transformer.wte.weight.shape[0] == PADDED_VOCAB_SIZE


def test_openai_layout_loads_without_prefix_and_with_mask_buffers(tmp_path):
    """OpenAI's gpt2 ... gpt2-xl on the hub: GPT2Model names (no `transformer.`), causal-mask buffers, no
    lm_head, n_inner null, n_ctx beside n_positions."""
    arch = Architecture(N=2, d_model=32, d_ff=128, h=4, d_k=8, d_v=8, positional_encoding_max_pos=64)
    theirs = hf_gpt2(arch)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in theirs.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(arch.N):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "openai-gpt2"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": VOCAB_SIZE,
              "layer_norm_epsilon": 1e-5, "bos_token_id": EOT, "eos_token_id": EOT}
    (folder / "config.json").write_text(json.dumps(config))
    ours, got_arch, _ = load_gpt(folder)
    assert got_arch == arch  # d_ff = 4 * n_embd when n_inner is null
    idx = tokens(2)
    with torch.no_grad():
        assert max_abs_diff(ours(idx), theirs(idx).logits) < TOLERANCE


def test_round_trip_gives_identical_tensors(exported, tmp_path):
    folder, model = exported
    back, arch, meta = load_gpt(folder / "hf")
    assert arch == ARCH and meta["step"] == 7 and meta["tokens"] == 1234
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and once more through the export of the imported folder: the same bytes of weights
    export.run(folder / "hf", tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (folder / "hf" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

def real_texts():
    texts = [orjson.loads(line)["text"] for chunk in ("00", "val") for line in sample_lines(chunk, 40)]
    return texts + ["Zürich is 408 m above sea level — naïve café.", "  two  spaces\n\n\ttab's 東京 ✓ 12345"]


def test_tokenizer_files_give_tiktokens_ids_on_real_text(exported):
    folder, _ = exported
    enc = gpt2_encoding()
    from_json = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "hf" / "tokenizer.json"))
    only_vocab = folder / "vocab-merges-only"  # the files older readers use: vocab.json + merges.txt
    only_vocab.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (only_vocab / name).write_bytes((folder / "hf" / name).read_bytes())
    from_merges = transformers.GPT2Tokenizer.from_pretrained(only_vocab)
    texts = real_texts()
    assert sum(map(len, texts)) > 50_000
    for text in texts:
        want = enc.encode_ordinary(text)
        assert from_json(text)["input_ids"] == want
        assert raw.encode(text).ids == want
        assert from_merges(text)["input_ids"] == want
        assert from_json.decode(want) == text
    assert from_json.eos_token_id == from_json.bos_token_id == EOT and len(from_json) == VOCAB_SIZE


def test_vocab_and_merges_are_gpt2s():
    vocab, merges = export.gpt2_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE and len(merges) == 50_000
    # GPT-2's merges.txt begins "Ġ t", "Ġ a", "h e"; its vocab.json has "Ġthe" = 262 and "!" = 0
    assert merges[:3] == ["Ġ t", "Ġ a", "h e"] and vocab["Ġthe"] == 262 and vocab["!"] == 0
    assert vocab["<|endoftext|>"] == EOT


# ---------------------------------------------------------------------------------------------------------
# Evaluate and generate with a Hugging Face folder

def test_evaluating_a_hf_folder_equals_scoring_it_in_transformers(tmp_path):
    _, val = make_split(tmp_path, n_chunks=1, shards_per_chunk=1, batches_per_shard=1, val_batches=4, max_len=30)
    theirs = hf_gpt2(seed=3)
    theirs.save_pretrained(tmp_path / "hf")
    start = 3
    doc = evaluate.run(tmp_path / "hf", val, tmp_path / "out" / "perplexity.json", tmp_path / "out" / "perplexity.md",
                       start, "cpu", "float32", threads=1, log=tmp_path / "evaluate.log", untrained_baseline=False)
    nll, n_tok, log2_means = 0.0, 0, []
    for batch in ShardReader(val):
        idx = torch.from_numpy(batch.tokens.astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(theirs(idx).logits.double(), dim=-1)
        L = idx.shape[1]
        targets = torch.cat([idx[:, 1:], torch.full((idx.shape[0], 1), EOT)], dim=1)
        per_pos = -logp.gather(-1, targets[..., None])[..., 0]
        nll += per_pos[:, start:].sum().item()
        n_tok += per_pos[:, start:].numel()
        log2_means += (per_pos[:, start:L - 1].mean(dim=1) / math.log(2)).tolist()  # the original's positions
    got = doc["overall"]
    assert got["tokens"] == n_tok
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-5)
    assert got["document_averaged_perplexity"] == pytest.approx(2 ** np.mean(log2_means), rel=1e-5)
    assert doc["architecture"]["N"] == ARCH.N


def test_generate_from_a_hf_folder_is_transformers_greedy_search(tmp_path, capsys):
    theirs = hf_gpt2(seed=4)
    theirs.save_pretrained(tmp_path / "hf")
    ini = write_tiny_ini(tmp_path / "config.ini", tmp_path, architecture={"N": 5})  # ignored for a folder
    prompt = "The capital of France is"
    assert generate.main(["--ini", str(ini), "--model", str(tmp_path / "hf"), "--prompt", prompt,
                          "--tokens", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    ids = torch.tensor([[EOT] + gpt2_encoding().encode(prompt)])
    with torch.no_grad():
        # an explicit mask: the start token <|endoftext|> would otherwise be taken for padding
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=EOT)
    new = out[0, ids.shape[1]:].tolist()
    want = gpt2_encoding().decode(new[:new.index(EOT)] if EOT in new else new)
    assert printed == prompt + want


# ---------------------------------------------------------------------------------------------------------
# The folder and the errors

def test_export_writes_a_complete_folder_atomically(exported):
    folder, _ = exported
    files = {p.name for p in (folder / "hf").iterdir()}
    assert files == {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "export.json"}
    assert not list(folder.glob(".hf.tmp.*"))
    config = json.loads((folder / "hf" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == 64
    assert config["resid_pdrop"] == 0.0  # the run's P_drop
    provenance = json.loads((folder / "hf" / "export.json").read_text())
    assert provenance["step"] == 7 and provenance["source"].endswith("final.pt")


def test_snakemake_export_plans_the_folder_and_the_documents_after_training(tmp_path):
    import re
    import subprocess
    import sys

    from tests.corpus import ROOT, small_corpus

    pytest.importorskip("snakemake", reason="snakemake is not installed in this environment (requirements.txt)")
    small_corpus(tmp_path / "data", 5)
    ini = write_tiny_ini(tmp_path / "config.ini", tmp_path, val={"results_dir": "{folder}/results"},
                         train={"num_of_chunks_to_use": 2})
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1",
                           "export", "--config", f"ini={ini}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    assert {k: jobs.get(k) for k in ("train", "export_hf", "lm_eval_docs", "export")} == \
        {"train": "1", "export_hf": "1", "lm_eval_docs": "1", "export": "1"}
    assert f"{tmp_path}/results/hf" in proc.stdout and f"{tmp_path}/results/lm_eval/val.jsonl" in proc.stdout


def test_generation_config_follows_inference_settings():
    sampling = {"how_many_tokens_to_generate": 30, "inference_method": "sampling", "beam_size": 4,
                "length_penalty": 1.0, "temperature": 0.8, "top_k": 0, "top_p": 0.9, "seed": 1}
    config = export.generation_config(sampling)
    assert config["do_sample"] is True and config["top_k"] == 0 and config["max_new_tokens"] == 30
    gen = transformers.GenerationConfig(**config)
    assert gen.temperature == 0.8 and gen.top_p == 0.9
    beams = export.generation_config({**sampling, "inference_method": "beam_search"})
    assert beams["num_beams"] == 4 and beams["do_sample"] is False


def test_another_architecture_is_an_error_naming_both(exported):
    folder, _ = exported
    other = Architecture(N=3, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
    with pytest.raises(ModelFileError, match=r"hf: the model has another architecture than expected: "
                                             r"N = 2 in the file but 3 in \[architecture\]"):
        load_gpt(folder / "hf", expected_arch=other)


def test_what_cannot_be_loaded_is_an_error_naming_file_and_key(tmp_path):
    theirs = hf_gpt2()
    theirs.save_pretrained(tmp_path / "ok")

    def variant(name, config=None, drop=None, rename=None):
        folder = tmp_path / name
        folder.mkdir()
        cfg = json.loads((tmp_path / "ok" / "config.json").read_text()) | (config or {})
        (folder / "config.json").write_text(json.dumps(cfg))
        state = hf.read_safetensors(tmp_path / "ok")
        if drop:
            del state[drop]
        if rename:
            state[rename[1]] = state.pop(rename[0])
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    with pytest.raises(ModelFileError, match=r"config.json: vocab_size = 50304, but this project's GPT-2 needs"):
        load_gpt(variant("vocab", {"vocab_size": 50304}))
    with pytest.raises(ModelFileError, match=r"activation_function = 'relu'"):
        load_gpt(variant("relu", {"activation_function": "relu"}))
    with pytest.raises(ModelFileError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\]"):
        load_gpt(variant("missing", drop="transformer.h.1.mlp.c_fc.bias"))
    untied = variant("untied")
    state = hf.read_safetensors(untied)
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    save_file(state, str(untied / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="lm_head.weight differs from transformer.wte.weight"):
        load_gpt(untied)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((tmp_path / "ok" / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFileError, match=r"pickled: no model.safetensors .* pytorch_model.bin, pickled weights"):
        load_gpt(pickled)
    cut = variant("truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated/model.safetensors: cannot be read as safetensors"):
        load_gpt(cut)


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelFileError, match=r"gpt2-tiny-test: no such file or folder, nor a Hugging Face hub id "
                                             r"in the local cache \(nothing is downloaded"):
        load_gpt("someone/gpt2-tiny-test")
    snapshot = tmp_path / "hub" / "models--someone--gpt2-tiny-test" / "snapshots" / "abc123"
    hf_gpt2().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    model, arch, meta = load_gpt("someone/gpt2-tiny-test")
    assert arch == ARCH and meta["hub_id"] == "someone/gpt2-tiny-test" and meta["path"] == str(snapshot)


def test_lm_eval_docs_are_the_scored_tokens_as_text(tmp_path):
    """Real documents cut at a token budget: the text is the tokens after <|endoftext|>, decoded; a character
    cut in half at the end is dropped and counted."""
    from pipeline.shards import Batch, ShardWriter

    enc = gpt2_encoding()
    texts = ["Zürich is 408 m above sea level — naïve café.", "Ein Beispiel: 東京"]
    ids = [[EOT] + enc.encode(t) for t in texts]
    ids[1] = ids[1][:-1]  # 東京's last token cut off: its bytes may end mid-character
    writer = ShardWriter(tmp_path / "val.arrow")
    for t, i in zip(texts, ids):
        writer.add(Batch(tokens=np.array([i], np.uint16), pile_set=np.array([12], np.int8),
                         n_bytes=np.array([len(t.encode())], np.int32)))
    writer.close()
    manifest = export.write_lm_eval_docs(tmp_path / "val.arrow", tmp_path / "val.jsonl", tmp_path / "manifest.json")
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"text": texts[0], "pile_set_name": "Wikipedia (en)", "tokens": len(ids[0]) - 1}
    want = enc.decode_bytes(ids[1][1:])
    assert rows[1]["text"].encode() == want[:len(rows[1]["text"].encode())] and texts[1].startswith(rows[1]["text"])
    assert manifest["documents"] == 2
    assert manifest["documents_cut_mid_character"] == (want != rows[1]["text"].encode())
    assert manifest["bytes"] == sum(len(r["text"].encode()) for r in rows)


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness

def test_lm_eval_scores_the_exported_model_with_the_shipped_task(exported):
    """The documented command on the exported folder: its bits_per_byte and word_perplexity equal our model's
    sum of -ln p over every token of each text after <|endoftext|> (lm-eval's positions), by hand."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed here; it lives in a venv of its "
                        "own (docs/hf.md): .venv-lmeval/bin/python -m pytest tests/test_hf.py -k lm_eval")
    import subprocess
    import sys

    from pipeline.shards import Batch, ShardWriter
    from tests.corpus import ROOT

    folder, model = exported
    enc = gpt2_encoding()
    writer = ShardWriter(folder / "val.arrow")  # real text, cut to fit the tiny model's 64 positions
    for line in sample_lines("val", 5):
        ids = [EOT] + enc.encode_ordinary(orjson.loads(line)["text"])[:50]
        writer.add(Batch(tokens=np.array([ids], np.uint16), pile_set=np.array([0], np.int8),
                         n_bytes=np.array([0], np.int32)))
    writer.close()
    export.write_lm_eval_docs(folder / "val.arrow", folder / "lm_eval" / "val.jsonl", folder / "lm_eval" / "m.json")
    lm_eval = [sys.executable, "-m", "lm_eval"]
    proc = subprocess.run(lm_eval + ["--model", "hf", "--model_args", f"pretrained={folder / 'hf'},dtype=float32",
                                     "--tasks", "pile_gpt2_val", "--include_path", str(ROOT / "eval"),
                                     "--device", "cpu", "--batch_size", "2", "--limit", "3",
                                     "--output_path", str(folder / "lm_eval_out")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [out] = list((folder / "lm_eval_out").rglob("results_*.json"))
    got = json.loads(out.read_text())["results"]["pile_gpt2_val"]

    rows = [json.loads(line) for line in (folder / "lm_eval" / "val.jsonl").read_text().splitlines()][:3]
    nll = words = n_bytes = 0
    for row in rows:
        idx = torch.tensor([[EOT] + enc.encode_ordinary(row["text"])])
        with torch.no_grad():
            logp = torch.log_softmax(model(idx)[0].double(), dim=-1)
        nll -= logp[:-1].gather(-1, idx[0, 1:, None]).sum().item()  # positions 0 ... L-2: no final target
        words += len(row["text"].split())
        n_bytes += len(row["text"].encode())
    assert got["bits_per_byte,none"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-4)
