"""GPT-2, in one file: the model of the seed project (and of OpenAI's GPT-2), sized by `[architecture]`.

    token + position embeddings -> N x [x + attn(ln_1(x)), x + mlp(ln_2(x))] -> ln_f -> logits (tied to wte)

Parameter names and shapes are OpenAI GPT-2's / Hugging Face GPT2LMHeadModel's, biases included, so that
importing or exporting GPT-2 weights is a renaming with two details:
  * OpenAI's `Conv1D` stores weights as (in, out); our `nn.Linear` stores (out, in): transpose
    attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights;
  * wte has PADDED_VOCAB_SIZE rows (50,257 rounded up to a multiple of 64, for fast matmuls); the rows past
    50,257 are zero, never an input, and their logits are sliced off, so they never win: export
    wte[:50257], import by copying into the first 50,257 rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import VOCAB_SIZE, Architecture

from model.matmul import Linear

PADDED_VOCAB_SIZE = (VOCAB_SIZE + 63) // 64 * 64  # 50,304


class KVCache:
    """Keys and values of every layer for positions 0 .. pos-1, for generation one step at a time.

    k, v: (N, batch, h, max_len, d_k). `GPT.forward(idx, kv_cache)` reads idx as the tokens at positions
    pos .. pos+T-1, appends their keys and values and advances pos by T.
    """

    def __init__(self, n_layer: int, batch_size: int, h: int, max_len: int, d_k: int, device, dtype):
        shape = (n_layer, batch_size, h, max_len, d_k)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def reorder(self, index: torch.LongTensor) -> None:
        """Keep (and reorder, repeat) the batch rows `index`: beam search's reshuffle of its beams."""
        index = index.to(self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


QUERY_BLOCK = 64  # queries per block of CausalAttentionCPU: their scores, 2 MB for the default model, stay in cache


class CausalAttentionCPU(torch.autograd.Function):
    """softmax(q k^T / sqrt(d_k) + causal mask) v for (B, h, T, d_k) tensors, a block of QUERY_BLOCK queries
    at a time against only the keys they see, the backward recomputing each block's softmax (flash attention's
    plan, with torch's batched matmuls as the tiles): no (T x T) scores in memory. Used on a CPU, where torch's
    flash kernel runs its d_k-wide tiles far below speed: one layer's forward + backward took 9 ms against
    11-14 (default model, float32), 9 against 14 (bfloat16), 66 against 82-92 (GPT-2 small, float32), 47
    against 80 (bfloat16), on 2 EPYC cores; the default model's training step ran 1.04x (float32) and 1.09x
    (bfloat16) faster, 1.07x and 1.08x compiled, GPT-2 small's 1.02x and 1.04x (interleaved A/B runs).

    In bfloat16 the scores are rounded to bfloat16 before the softmax, as in any autocast attention written
    with matmuls (nanoGPT's, transformers' eager one): relative error 1e-2 against float64, flash's 6e-3."""

    @staticmethod
    def forward(ctx, q, k, v):
        shape = q.shape
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B h, T, d_k)
        T = q.shape[1]
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1)
        out = torch.empty_like(q)
        for a in range(0, T, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, T)  # queries a..b-1 see keys 0..b-1
            out[:, a:b] = torch.bmm(CausalAttentionCPU._probs(q, k, mask, a, b), v[:, :b])
        ctx.save_for_backward(q, k, v, out, mask)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def _probs(q, k, mask, a, b):
        """The softmax of queries a..b-1 over keys 0..b-1: made by the forward, remade by the backward."""
        s = torch.baddbmm(mask[a:b, :b], q[:, a:b], k[:, :b].transpose(1, 2), alpha=1.0 / math.sqrt(q.shape[2]))
        return torch.softmax(s, dim=-1)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, mask = ctx.saved_tensors
        T, scale = q.shape[1], 1.0 / math.sqrt(q.shape[2])
        d_out = d_out.reshape(q.shape)
        # dS = P * (dP - rowsum(dO * O)): the softmax's backward with its row sums taken once, up front, in at
        # least float32 (in bfloat16 the difference of two near-equal terms would lose most of its bits)
        acc = torch.promote_types(q.dtype, torch.float32)
        delta = (d_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a in range(0, T, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, T)
            p = CausalAttentionCPU._probs(q, k, mask, a, b)
            dv[:, :b].baddbmm_(p.transpose(1, 2), d_out[:, a:b])
            ds = torch.bmm(d_out[:, a:b], v[:, :b].transpose(1, 2)).sub_(delta[:, a:b]).mul_(p)
            dq[:, a:b] = torch.bmm(ds, k[:, :b]).mul_(scale)
            dk[:, :b].baddbmm_(ds.transpose(1, 2), q[:, a:b], alpha=scale)
        return dq.view(ctx.shape), dk.view(ctx.shape), dv.view(ctx.shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, arch: Architecture, P_drop: float, attention_dropout: bool = False):
        super().__init__()
        self.h, self.d_k = arch.h, arch.d_k
        self.c_attn = Linear(arch.d_model, 3 * arch.d_model)  # queries, keys, values of all heads at once
        self.c_proj = Linear(arch.d_model, arch.d_model)
        # Dropout on the attention weights is GPT-2's (attn_pdrop), not the original project's: off by default.
        self.attn_P_drop = P_drop if attention_dropout else 0.0
        self.resid_dropout = nn.Dropout(P_drop)

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, self.d_k).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d_k)
        mask, is_causal = None, True
        if kv_cache is not None:
            start = kv_cache.pos
            kv_cache.k[layer, :, :, start:start + T] = k
            kv_cache.v[layer, :, :, start:start + T] = v
            k, v = kv_cache.k[layer, :, :, :start + T], kv_cache.v[layer, :, :, :start + T]
            if start > 0:
                # Query i sits at position start+i and sees keys 0 .. start+i; SDPA's is_causal would align
                # the mask top-left (query i sees keys 0 .. i), which is wrong once there is a prefix.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        dropout_p = self.attn_P_drop if self.training else 0.0
        if kv_cache is None and dropout_p == 0.0 and x.device.type == "cpu":
            with torch.autocast("cpu", enabled=False):  # q, k, v are in autocast's dtype already
                y = CausalAttentionCPU.apply(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, arch: Architecture, P_drop: float):
        super().__init__()
        self.c_fc = Linear(arch.d_model, arch.d_ff)
        self.c_proj = Linear(arch.d_ff, arch.d_model)
        self.dropout = nn.Dropout(P_drop)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU


class Block(nn.Module):
    """Pre-LayerNorm decoder block (GPT-2): the LayerNorm is inside the residual branch."""

    def __init__(self, arch: Architecture, P_drop: float, attention_dropout: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(arch.d_model, eps=1e-5)
        self.attn = CausalSelfAttention(arch, P_drop, attention_dropout)
        self.ln_2 = nn.LayerNorm(arch.d_model, eps=1e-5)
        self.mlp = MLP(arch, P_drop)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """P_drop: dropout on the embeddings and on each residual branch's output (the original's), and on the
    attention weights too with attention_dropout (GPT-2's). scale_residual_init: GPT-2's 1/sqrt(2N) on the
    residual output projections' init (false: the original's plain N(0, init_std) everywhere)."""

    def __init__(self, arch: Architecture, P_drop: float = 0.0, init_std: float = 0.02,
                 scale_residual_init: bool = True, attention_dropout: bool = False):
        super().__init__()
        self.arch = arch
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(PADDED_VOCAB_SIZE, arch.d_model),
            wpe=nn.Embedding(arch.positional_encoding_max_pos, arch.d_model),
            drop=nn.Dropout(P_drop),
            h=nn.ModuleList(Block(arch, P_drop, attention_dropout) for _ in range(arch.N)),
            ln_f=nn.LayerNorm(arch.d_model, eps=1e-5),
        ))
        self.lm_head = nn.Linear(arch.d_model, PADDED_VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the output projection is the embedding
        self.init_weights(init_std, scale_residual_init)

    @torch.no_grad()
    def init_weights(self, init_std: float, scale_residual_init: bool = True) -> None:
        """N(0, init_std) everywhere; with scale_residual_init, residual output projections scaled by 1/sqrt(2N)
        (GPT-2 paper, sec. 2.3: each block adds two branches to the residual stream, so their sum's variance
        stays put as N grows); biases 0, LayerNorm 1; padded vocab rows 0."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0)
            elif scale_residual_init and name.endswith("c_proj.weight"):
                p.normal_(0.0, init_std / math.sqrt(2 * self.arch.N))
            else:
                p.normal_(0.0, init_std)
        self.transformer.wte.weight[VOCAB_SIZE:].zero_()

    def forward(self, idx: torch.LongTensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, 50257) for tokens idx (B, T); with a kv_cache, idx sits at positions kv_cache.pos on."""
        return self.lm_head(self.hidden_states(idx, kv_cache))[..., :VOCAB_SIZE]

    def hidden_states(self, idx: torch.LongTensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, d_model): logits are this times wte^T."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.arch.positional_encoding_max_pos:
            raise ValueError(f"{start + T} positions, but the model has positional_encoding_max_pos = "
                             f"{self.arch.positional_encoding_max_pos}")
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"the KV cache holds {kv_cache.max_len} positions; {start + T} asked for")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for batch_size sequences of up to max_len positions, on the model's device and dtype."""
        w = self.transformer.wte.weight
        return KVCache(self.arch.N, batch_size, self.arch.h, min(max_len, self.arch.positional_encoding_max_pos),
                       self.arch.d_k, w.device, w.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (the tied lm_head counted once); non_embedding leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n
