"""Hugging Face GPT-2 <-> this project's GPT (model/gpt.py): the same parameters under the same names.

    our GPT                                    Hugging Face GPT2LMHeadModel (model.safetensors)
    transformer.wte.weight (50,304, d)         transformer.wte.weight (50,257, d)   rows past 50,257 are padding
    transformer.h.i.attn.c_attn.weight (3d, d) transformer.h.i.attn.c_attn.weight (d, 3d)   Linear vs Conv1D:
    ... attn.c_proj, mlp.c_fc, mlp.c_proj      ... the same four weights, transposed        transposed
    lm_head.weight (tied to wte)               not stored: tie_word_embeddings = true
    everything else                            the same name, the same tensor

OpenAI's own checkpoints (gpt2 ... gpt2-xl on the hub) were saved from GPT2Model: their names have no
`transformer.` prefix and they carry each layer's causal mask as a buffer (`attn.bias`, `attn.masked_bias`),
which is not a parameter and is ignored here. The feed-forward's GELU is the tanh approximation in both
(`activation_function = gelu_new`), LayerNorm's epsilon 1e-5, attention scaled by 1/sqrt(d_k).

Nothing here needs `transformers`: config.json is plain JSON and the weights are safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import ModelFileError, check_architecture
from model.gpt import GPT, PADDED_VOCAB_SIZE
from pipeline.config import EOT, VOCAB_SIZE, Architecture
from pipeline.io import read_json

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # OpenAI's checkpoints store the causal mask; not weights
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")     # both are GPT-2's tanh approximation of GELU
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------
# config.json

def hf_config(arch: Architecture, P_drop: float = 0.1, attention_dropout: bool = True,
              init_std: float = 0.02) -> dict:
    """config.json of a GPT2LMHeadModel with this architecture (dropout rates matter only to fine-tuning)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "n_positions": arch.positional_encoding_max_pos,
        "n_ctx": arch.positional_encoding_max_pos,  # older readers (and lm-eval) look for either name
        "n_embd": arch.d_model,
        "n_layer": arch.N,
        "n_head": arch.h,
        "n_inner": arch.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "embd_pdrop": P_drop,
        "resid_pdrop": P_drop,
        "attn_pdrop": P_drop if attention_dropout else 0.0,
        "initializer_range": init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "use_cache": True,
    }


def architecture_from_hf_config(cfg: dict, where) -> Architecture:
    """The [architecture] of a Hugging Face GPT-2 config.json; ModelFileError naming `where` if this GPT
    cannot represent it (another model type, vocabulary, activation, untied output layer, ...)."""
    def need(key, ok, wanted):
        if not ok(cfg.get(key)):
            raise ModelFileError(f"{where}: {key} = {cfg.get(key)!r}, but this project's GPT-2 needs {wanted}")

    need("model_type", lambda v: v == "gpt2", "'gpt2'")
    need("vocab_size", lambda v: v == VOCAB_SIZE, f"GPT-2's vocabulary of {VOCAB_SIZE}")
    need("activation_function", lambda v: v in TANH_GELUS, " or ".join(TANH_GELUS) + " (GPT-2's tanh GELU)")
    need("layer_norm_epsilon", lambda v: v is None or abs(v - 1e-5) < 1e-12, "1e-5")
    need("tie_word_embeddings", lambda v: v is None or v is True, "true (the output layer is the embedding)")
    need("scale_attn_weights", lambda v: v is None or v is True, "true (attention scaled by 1/sqrt(d_k))")
    need("scale_attn_by_inverse_layer_idx", lambda v: not v, "false")
    need("add_cross_attention", lambda v: not v, "false (a decoder-only GPT-2)")
    for key in ("n_embd", "n_layer", "n_head", "n_positions"):
        need(key, lambda v: isinstance(v, int) and v > 0, "a positive integer")
    d_model, h = cfg["n_embd"], cfg["n_head"]
    if d_model % h:
        raise ModelFileError(f"{where}: n_embd = {d_model} is not a multiple of n_head = {h}")
    return Architecture(N=cfg["n_layer"], d_model=d_model, d_ff=cfg.get("n_inner") or 4 * d_model, h=h,
                        d_k=d_model // h, d_v=d_model // h, positional_encoding_max_pos=cfg["n_positions"])


# ---------------------------------------------------------------------------------------------------------
# Weights

def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (float tensors on the CPU, contiguous): Conv1D weights transposed, wte
    cut to GPT-2's 50,257 rows, lm_head left out (tied to wte, as Hugging Face saves it)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS):
            t = t.t()
        elif name == "transformer.wte.weight":
            t = t[:VOCAB_SIZE].clone()  # its own storage: safetensors refuses views of a larger tensor
        out[name] = t.contiguous()
    return out


def _hf_names(state: dict, where) -> dict[str, torch.Tensor]:
    """The state dict under GPT2LMHeadModel's names: `transformer.` added where a GPT2Model checkpoint lacks
    it, the causal-mask buffers dropped, a stored lm_head checked to be the embedding (we tie them)."""
    out = {}
    for name, t in state.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name
        out[name] = t
    head = out.pop("lm_head.weight", None)
    wte = out.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ModelFileError(f"{where}: lm_head.weight differs from transformer.wte.weight; this project's GPT "
                             f"ties its output layer to the embedding, so an untied model cannot be loaded")
    return out


def gpt_from_hf_state_dict(state: dict, arch: Architecture, where) -> GPT:
    """Our GPT (float32, CPU, eval mode) from GPT2LMHeadModel's or GPT2Model's state dict; ModelFileError
    naming `where` and the keys when a weight is missing, unexpected or of the wrong shape."""
    hf = _hf_names(state, where)
    model = GPT(arch)
    ours = model.state_dict()
    missing = [k for k in ours if k != "lm_head.weight" and k not in hf]
    unexpected = [k for k in hf if k not in ours]
    if missing or unexpected:
        raise ModelFileError(f"{where}: not the weights of a GPT-2 with {arch}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    new = {}
    for name, target in ours.items():
        if name == "lm_head.weight":
            continue
        t = hf[name].float()
        if name.endswith(CONV1D_WEIGHTS):
            t = t.t()
        if name == "transformer.wte.weight":
            if t.shape != (VOCAB_SIZE, arch.d_model):
                raise ModelFileError(f"{where}: transformer.wte.weight has shape {tuple(t.shape)}, "
                                     f"not ({VOCAB_SIZE}, {arch.d_model})")
            t = torch.cat([t, t.new_zeros(PADDED_VOCAB_SIZE - VOCAB_SIZE, arch.d_model)])  # padding rows: 0
        if t.shape != target.shape:
            raise ModelFileError(f"{where}: {name} has shape {tuple(hf[name].shape)}, which does not fit {arch}")
        new[name] = t
    new["lm_head.weight"] = new["transformer.wte.weight"]
    model.load_state_dict(new)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Folders

def is_hf_folder(path) -> bool:
    return Path(path, "config.json").is_file()


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names; pickled weights are refused."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelFileError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f"; it has {', '.join(pickled)}, pickled weights, which are never loaded here: convert them to "
                f"safetensors first" if pickled else "")
        raise ModelFileError(f"{folder}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}){hint}")
    state = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    state[key] = fh.get_tensor(key)
        except Exception as e:  # a missing shard, a truncated header, ...
            raise ModelFileError(f"{f}: cannot be read as safetensors (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from None
    return state


def load_hf_folder(folder, map_location="cpu", expected_arch: Architecture | None = None):
    """(GPT in eval mode, its Architecture, meta) from a Hugging Face GPT-2 folder: config.json + safetensors.

    meta: {"path", "format": "huggingface", "hf_config"}, plus step/tokens/run_dir/train when the folder was
    exported by this project (export.json). expected_arch: checked from config.json, before any weight is read.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        cfg = read_json(config_path)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{config_path}: cannot be read as a Hugging Face config ({e})") from None
    arch = architecture_from_hf_config(cfg, config_path)
    check_architecture(arch, expected_arch, str(folder))
    model = gpt_from_hf_state_dict(read_safetensors(folder), arch, folder)
    model.to(map_location if map_location is not None else "cpu")
    meta = {"path": str(folder), "format": "huggingface", "hf_config": cfg}
    provenance = folder / "export.json"
    if provenance.is_file():
        try:
            exported = read_json(provenance)
        except ValueError as e:
            raise ModelFileError(f"{provenance}: not JSON ({e})") from None
        meta.update({k: exported[k] for k in ("step", "tokens", "run_dir", "train") if k in exported})
    return model, arch, meta


def save_hf_weights(model: GPT, path) -> None:
    """model.safetensors in GPT2LMHeadModel's layout (metadata format=pt, which transformers asks for)."""
    save_file(to_hf_state_dict(model), str(path), metadata={"format": "pt"})


def could_be_hub_id(name: str) -> bool:
    """"gpt2" or "owner/name": no file suffix, at most one slash, not a relative or absolute path."""
    return (bool(name) and name.count("/") <= 1 and not name.startswith((".", "/", "~"))
            and not name.endswith((".pt", ".safetensors", ".json", "/")))


def hub_cache_folder(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of `repo_id` (e.g. "gpt2", "openai-community/gpt2") at its
    `main` ref, or None: this never downloads (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if not could_be_hub_id(repo_id):
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        return snapshot if is_hf_folder(snapshot) else None
    found = sorted(p for p in snapshots.glob("*") if is_hf_folder(p)) if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None  # several snapshots and no ref: no way to know which
