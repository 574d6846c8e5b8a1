"""Tiny mixture-of-experts stand-ins for the tests, built from configs; nothing is downloaded.

- :func:`qwen3_moe`: transformers 5 ``Qwen3MoeForCausalLM`` run bidirectionally; its experts are one
  module with fused 3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), called as
  ``experts(hidden_states, top_k_index, top_k_weights)``.
- :func:`olmoe_style`: our own model with OLMoE's (and LLaDA-MoE-7B-A1B's) MoE block: a softmax top-k
  ``gate`` linear and ``experts`` as a ``ModuleList`` of gated MLPs, each fed its routed rows in
  (top-k slot, token) order, as OLMoE's loop does.
- :func:`llada2_style`: our own model with LLaDA2.0's (Ling/Bailing) structure: a fused
  ``query_key_value`` projection and ``dense`` output, q/k RMSNorm, partial rotary; a sigmoid router
  with an ``expert_bias`` buffer and group-limited top-k, ``routed_scaling_factor``, a shared expert.
  ``fused=False`` keeps the experts as a ``ModuleList`` fed in ``argsort`` order (the official file's
  inference path); ``fused=True`` stores them as 3-D ``gate_proj``/``up_proj`` (E, I, H) and
  ``down_proj`` (E, H, I), called as ``experts(hidden_states, routing_weights, selected_experts)``.

Every model takes ``(input_ids, attention_mask=None)``, attends bidirectionally through
``F.scaled_dot_product_attention`` and returns an object with ``logits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.models import MASK_TOKEN_ID, VOCAB_SIZE, RMSNorm, _build


def qwen3_moe(seed: int = 0, **overrides: Any) -> nn.Module:
    """Tiny bidirectional transformers Qwen3-MoE: 2 layers, hidden 32, 4 experts, top-2."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=128,
        is_causal=False,
        mask_token_id=MASK_TOKEN_ID,
    )
    kwargs.update(overrides)
    config = Qwen3MoeConfig(attn_implementation="sdpa", **kwargs)
    return _build(lambda: Qwen3MoeForCausalLM(config), seed)


@dataclass
class MoeConfig:
    """Config of our own MoE stand-ins (field names as in the LLaDA2 / OLMoE configs)."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    moe_intermediate_size: int = 16
    num_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    num_shared_experts: int = 1
    partial_rotary_factor: float = 0.5
    mask_token_id: int = MASK_TOKEN_ID
    rms_norm_eps: float = 1e-6
    model_type: str = "moe-stand-in"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rope(x: Tensor, rotary: int) -> Tensor:
    """Rotate-half RoPE on the first ``rotary`` features of (B, heads, T, head_dim)."""
    t = x.shape[-2]
    inv = 1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32, device=x.device) / rotary)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32, device=x.device), inv)
    emb = torch.cat((freqs, freqs), -1)  # (T, rotary)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :rotary], x[..., rotary:]
    r1, r2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-r2, r1), -1) * sin, rest), dim=-1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False, enable_gqa=True)


class MoeAttention(nn.Module):
    """Separate q/k/v/o projections (OLMoE layout), full rotary."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        h, d, kv = config.hidden_size, config.head_dim, config.num_key_value_heads
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, kv * d, bias=False)
        self.v_proj = nn.Linear(h, kv * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        d = self.config.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        out = _sdpa(_rope(q, d), _rope(k, d), v, bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LLaDA2Attention(nn.Module):
    """LLaDA2.0's attention: fused ``query_key_value``, q/k RMSNorm, partial rotary, ``dense`` output."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.query_key_value = nn.Linear(h, (heads + 2 * kv) * d, bias=False)
        self.query_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.dense = nn.Linear(heads * d, h, bias=False)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        c = self.config
        qkv = self.query_key_value(x).view(b, t, c.num_attention_heads + 2 * c.num_key_value_heads, -1)
        q, k, v = qkv.split([c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads], dim=-2)
        q, k, v = (s.transpose(1, 2) for s in (q, k, v))  # (B, heads, T, d)
        rotary = int(c.head_dim * c.partial_rotary_factor)
        q = _rope(self.query_layernorm(q), rotary)
        k = _rope(self.key_layernorm(k), rotary)
        return self.dense(_sdpa(q, k, v, bias).transpose(1, 2).reshape(b, t, -1))


class ExpertMlp(nn.Module):
    """One gated expert with nn.Linear children (OLMoE / LLaDA2 official)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OlmoeSparseMoeBlock(nn.Module):
    """OLMoE's MoE block: softmax top-k over a ``gate`` linear, a ``ModuleList`` of experts."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertMlp(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        b, t, h = hidden.shape
        flat = hidden.view(-1, h)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float)
        weights, selected = probs.topk(self.top_k, dim=-1)  # (N, k)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(selected, len(self.experts)).permute(2, 1, 0)  # (E, k, N)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])  # rows in (slot, token) order
            if token.numel():
                y = expert(flat[token]) * weights[token, slot, None].to(flat.dtype)
                out.index_add_(0, token, y)
        return out.view(b, t, h)


class LLaDA2Gate(nn.Module):
    """Sigmoid router with ``expert_bias`` and group-limited top-k; returns (index, weight, logits)."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = F.linear(flat.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        routing = scores + self.expert_bias
        n = routing.shape[0]
        group_scores = routing.view(n, c.n_group, -1).topk(2, dim=-1)[0].sum(-1)  # (N, groups)
        groups = group_scores.topk(c.topk_group, dim=-1)[1]
        allowed = torch.zeros_like(group_scores).scatter_(1, groups, 1).bool()
        allowed = allowed[:, :, None].expand(n, c.n_group, c.num_experts // c.n_group).reshape(n, -1)
        index = routing.masked_fill(~allowed, float("-inf")).topk(c.num_experts_per_tok, dim=-1)[1]
        weight = scores.gather(1, index)
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20) * c.routed_scaling_factor
        return index, weight, logits


class LLaDA2FusedExperts(nn.Module):
    """Fused LLaDA2 port: ``gate_proj``/``up_proj`` (E, I, H), ``down_proj`` (E, H, I)."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        bound = 1 / math.sqrt(h)
        self.gate_proj = nn.Parameter(torch.empty(e, i, h).uniform_(-bound, bound))
        self.up_proj = nn.Parameter(torch.empty(e, i, h).uniform_(-bound, bound))
        self.down_proj = nn.Parameter(torch.empty(e, h, i).uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i)))
        self.act_fn = nn.SiLU()

    def forward(self, hidden: Tensor, routing_weights: Tensor, selected_experts: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        for e in range(self.gate_proj.shape[0]):
            token, slot = torch.where(selected_experts == e)
            if token.numel():
                x = hidden[token]
                y = F.linear(
                    self.act_fn(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]),
                    self.down_proj[e],
                )
                out.index_add_(0, token, y * routing_weights[token, slot, None].to(y.dtype))
        return out


class LLaDA2SparseMoeBlock(nn.Module):
    """LLaDA2.0's MoE block: routed experts (either layout) plus a shared expert."""

    def __init__(self, config: MoeConfig, fused: bool) -> None:
        super().__init__()
        self.config = config
        self.gate = LLaDA2Gate(config)
        width = config.moe_intermediate_size
        if fused:
            self.experts = LLaDA2FusedExperts(config)
        else:
            experts = (ExpertMlp(config.hidden_size, width) for _ in range(config.num_experts))
            self.experts = nn.ModuleList(experts)
        self.shared_experts = ExpertMlp(config.hidden_size, width * config.num_shared_experts)

    def forward(self, hidden: Tensor) -> Tensor:
        b, t, h = hidden.shape
        index, weight, _ = self.gate(hidden)
        flat = hidden.view(-1, h)
        if isinstance(self.experts, nn.ModuleList):
            y = self._sorted_dispatch(flat, index, weight)
        else:
            y = self.experts(flat, weight, index)
        return y.view(b, t, h) + self.shared_experts(hidden)

    def _sorted_dispatch(self, flat: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        # The official inference path: rows sorted by expert with argsort, each expert a slice.
        order = index.view(-1).argsort()
        rows = flat[order // index.shape[1]]
        counts = torch.bincount(index.view(-1), minlength=len(self.experts)).tolist()
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                outs.append(self.experts[e](rows[start : start + count]))
            start += count
        gathered = torch.empty_like(rows)
        gathered[order] = torch.cat(outs)
        return (gathered.view(*index.shape, -1) * weight[..., None].to(flat.dtype)).sum(1)


class MoeBlock(nn.Module):
    def __init__(self, config: MoeConfig, style: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if style == "olmoe":
            self.self_attn = MoeAttention(config)
            self.mlp = OlmoeSparseMoeBlock(config)
        else:
            self.attention = LLaDA2Attention(config)
            self.mlp = LLaDA2SparseMoeBlock(config, fused=style == "llada2-fused")

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        attn = self.self_attn if hasattr(self, "self_attn") else self.attention
        x = x + attn(self.input_layernorm(x), bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoeInner(nn.Module):
    def __init__(self, config: MoeConfig, style: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoeBlock(config, style) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeStandIn(nn.Module):
    """``model.{embed_tokens, layers, norm}`` + ``lm_head``, like the Hugging Face MoE models."""

    def __init__(self, config: MoeConfig, style: str) -> None:
        super().__init__()
        self.config = config
        self.model = MoeInner(config, style)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalLMOutputWithPast:
        x = self.model.embed_tokens(input_ids)
        bias = None
        if attention_mask is not None:  # (B, T) padding mask -> additive bias on the keys (B, 1, 1, T)
            keep = attention_mask.to(x.dtype)[:, None, None, :]
            bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.model.layers:
            x = layer(x, bias)
        return CausalLMOutputWithPast(logits=self.lm_head(self.model.norm(x)))


def olmoe_style(seed: int = 0, **overrides: Any) -> MoeStandIn:
    """OLMoE / LLaDA-MoE layout: ``ModuleList`` experts, softmax top-k (8 experts, top-2)."""
    config = MoeConfig(**overrides)
    return _build(lambda: MoeStandIn(config, "olmoe"), seed)


def llada2_style(seed: int = 0, *, fused: bool = False, **overrides: Any) -> MoeStandIn:
    """LLaDA2.0 layout: fused ``query_key_value``, group-limited sigmoid router with a non-zero
    ``expert_bias`` (so routing differs from a plain top-k of the logits), shared expert; experts as a
    ``ModuleList`` or (``fused=True``) separate 3-D parameters."""
    config = MoeConfig(**overrides)

    def factory() -> MoeStandIn:
        model = MoeStandIn(config, "llada2-fused" if fused else "llada2")
        for layer in model.model.layers:
            layer.mlp.gate.expert_bias.copy_(torch.linspace(-0.02, 0.02, config.num_experts))
        return model

    return _build(factory, seed)
