"""Tiny stand-in models for the tests, built from configs; nothing is downloaded.

Every constructor seeds its own RNG (without disturbing the global one) and returns an eval-mode
float32 model whose attention goes through ``F.scaled_dot_product_attention``:

- :func:`llama_bidirectional` / :func:`qwen2_gqa`: transformers Llama / Qwen2 with ``is_causal=False``
  (the base architectures of LLaDA-like and Dream-like diffusion LMs; Qwen2 with grouped-query attention).
- :func:`llama_causal` / :func:`gpt2_causal`: autoregressive references.
- :func:`diffusion_gemma`: transformers' ``DiffusionGemmaForBlockDiffusion`` (prompt encoder + canvas
  decoder, mixture-of-experts MLP); :func:`diffusion_gemma_inputs` builds valid forward kwargs.
- :class:`LLaDAModelLM` / :func:`tiny_llada`: our own small model with the module names and call
  structure of LLaDA's ``modeling_llada.py`` (no transformers attention code, attention as a block
  method, the outer model calling ``self.model.forward`` directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

VOCAB_SIZE = 64
MASK_TOKEN_ID = 63

# transformers 5.23 honours ``config.is_causal = False`` for Qwen2 (``create_causal_mask`` falls back to a
# bidirectional mask); checked by tests/test_models_smoke.py. Should a future version ignore it, set this
# to False so tests that need bidirectional attention can skip the Qwen2 stand-in.
QWEN2_BIDIRECTIONAL = True
# transformers 4.4x (which LLaDA and Dream pin) has no DiffusionGemma and ignores is_causal=False: the
# compatibility run (.ci/run) uses only what exists there.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def use_eager_attention(model: nn.Module) -> nn.Module:
    """Switch a transformers model to eager (matmul + softmax) attention, on every supported version."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers 4.4x reads the implementation from the config at call time
        model.config._attn_implementation = "eager"
    return model


_SMALL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def sharpen(model: nn.Module, factor: float, *, norms: bool = False) -> nn.Module:
    """Scale the q/k projections in place so attention is peaked and sinks stand out, as in trained models.

    ``norms`` also scales q/k normalisation weights (Qwen3-MoE's ``q_norm``/``k_norm``, LLaDA2's
    ``query_layernorm``/``key_layernorm``), which otherwise undo the projections' scale.
    """
    norm_names = ("q_norm.weight", "k_norm.weight", "query_layernorm.weight", "key_layernorm.weight")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(factor)
        if norms:
            for name, param in model.named_parameters():
                if name.endswith(norm_names):
                    param.mul_(factor)
    return model


def _build(factory: Any, seed: int) -> nn.Module:
    """Run ``factory()`` under a private RNG seeded with ``seed``; return it in eval mode, float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.float().eval()


def llama_bidirectional(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """Tiny bidirectional Llama (4 heads, 4 KV heads, 2 layers) with ``mask_token_id = 63``.

    Args:
        seed: seed for the weight initialisation.
        **overrides: ``LlamaConfig`` fields to change.

    Returns:
        An eval-mode float32 ``LlamaForCausalLM`` using SDPA attention.
    """
    kwargs = dict(_SMALL, num_key_value_heads=4, is_causal=False, mask_token_id=MASK_TOKEN_ID)
    kwargs.update(overrides)
    config = LlamaConfig(attn_implementation="sdpa", **kwargs)
    return _build(lambda: LlamaForCausalLM(config), seed)


def qwen2_gqa(seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """Tiny bidirectional Qwen2 with grouped-query attention (4 heads, 2 KV heads), Dream's base.

    See :data:`QWEN2_BIDIRECTIONAL` for whether ``is_causal=False`` is honoured.

    Args:
        seed: seed for the weight initialisation.
        **overrides: ``Qwen2Config`` fields to change.

    Returns:
        An eval-mode float32 ``Qwen2ForCausalLM`` using SDPA attention.
    """
    kwargs = dict(_SMALL, num_key_value_heads=2, is_causal=False, mask_token_id=MASK_TOKEN_ID)
    kwargs.update(overrides)
    config = Qwen2Config(attn_implementation="sdpa", **kwargs)
    return _build(lambda: Qwen2ForCausalLM(config), seed)


def llama_causal(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """Tiny causal Llama (autoregressive reference; no mask token).

    Args:
        seed: seed for the weight initialisation.
        **overrides: ``LlamaConfig`` fields to change.

    Returns:
        An eval-mode float32 ``LlamaForCausalLM`` using SDPA attention.
    """
    kwargs = dict(_SMALL, num_key_value_heads=4)
    kwargs.update(overrides)
    config = LlamaConfig(attn_implementation="sdpa", **kwargs)
    return _build(lambda: LlamaForCausalLM(config), seed)


def gpt2_causal(seed: int = 0, **overrides: Any) -> GPT2LMHeadModel:
    """Tiny GPT-2 (2 layers, 4 heads, width 32; autoregressive reference).

    Args:
        seed: seed for the weight initialisation.
        **overrides: ``GPT2Config`` fields to change.

    Returns:
        An eval-mode float32 ``GPT2LMHeadModel`` using SDPA attention.
    """
    # GPT-2's default bos/eos (50256) lie outside the tiny vocabulary
    kwargs = dict(vocab_size=VOCAB_SIZE, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    kwargs.update(bos_token_id=62, eos_token_id=62)
    kwargs.update(overrides)
    config = GPT2Config(attn_implementation="sdpa", **kwargs)
    return _build(lambda: GPT2LMHeadModel(config), seed)


def diffusion_gemma(seed: int = 0, **text_overrides: Any) -> nn.Module:
    """Tiny ``DiffusionGemmaForBlockDiffusion``: a prompt encoder plus a bidirectional canvas decoder.

    Text model: hidden 64, 2 layers (sliding then full attention), 4 heads / 2 KV heads, head_dim 16,
    4 experts top-2, sliding window 16; canvas of 16 tokens. The vision tower is shrunk to one 16-wide
    layer (the default adds ~160M parameters); special image ids sit at 60–62.

    Args:
        seed: seed for the weight initialisation.
        **text_overrides: ``DiffusionGemmaTextConfig`` fields to change.

    Returns:
        An eval-mode float32 model using SDPA attention. Call it with :func:`diffusion_gemma_inputs`.
    """
    from transformers import (
        DiffusionGemmaConfig,
        DiffusionGemmaForBlockDiffusion,
        DiffusionGemmaTextConfig,
        Gemma4VisionConfig,
    )

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        sliding_window=16,
        max_position_embeddings=256,
    )
    kwargs.update(text_overrides)
    # the last layer must be full attention (transformers warns and forces it otherwise)
    layers = kwargs["num_hidden_layers"]
    kwargs.setdefault("layer_types", ["sliding_attention"] * (layers - 1) + ["full_attention"])
    text = DiffusionGemmaTextConfig(**kwargs)
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=4,
        position_embedding_size=64,
    )
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=16,
        boi_token_id=60,
        eoi_token_id=61,
        image_token_id=62,
    )
    config._attn_implementation = "sdpa"
    return _build(lambda: DiffusionGemmaForBlockDiffusion(config), seed)


def diffusion_gemma_inputs(
    model: nn.Module, batch: int = 1, seq: int = 8, seed: int = 0
) -> dict[str, Tensor]:
    """Valid forward kwargs for :func:`diffusion_gemma`: a prompt plus a full canvas.

    Without ``decoder_input_ids`` the model draws a random canvas from the global RNG, so one is always
    given here. Token ids avoid the special ids (0–2 and 60–63).

    Args:
        model: the model from :func:`diffusion_gemma`.
        batch: batch size.
        seq: prompt length (the canvas is always ``config.canvas_length`` tokens).
        seed: seed for the token ids.

    Returns:
        ``input_ids`` (batch, seq), ``attention_mask`` (batch, seq) of ones and ``decoder_input_ids``
        (batch, canvas_length), on the model's device.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    canvas = model.config.canvas_length
    return {
        "input_ids": torch.randint(3, 60, (batch, seq), generator=gen).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "decoder_input_ids": torch.randint(3, 60, (batch, canvas), generator=gen).to(device),
    }


# --------------------------------------------------------------------------------------------------
# TinyLLaDA: LLaDA's module layout and call structure, written small.
# --------------------------------------------------------------------------------------------------


@dataclass
class LLaDAConfig:
    """Config with LLaDA's field names (``d_model``, ``n_heads``, ``n_layers``, ...)."""

    vocab_size: int = VOCAB_SIZE
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_layers: int = 2
    mlp_hidden_size: int = 64
    mask_token_id: int = MASK_TOKEN_ID
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 128
    model_type: str = "llada"

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnt scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention) applied to q and k of shape (B, nh, T, hs)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin


class LLaDALlamaBlock(nn.Module):
    """One pre-norm transformer block with LLaDA's linear names and a SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig, layer_id: int) -> None:
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        d, nh, nkv = config.d_model, config.n_heads, config.effective_n_kv_heads
        if d % nh or nh % nkv:
            raise ValueError(
                f"d_model={d} must be divisible by n_heads={nh}, and n_heads by n_kv_heads={nkv}; "
                "change the config."
            )
        self.head_dim = d // nh
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, nkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, nkv * self.head_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        """Multi-head attention on projected q, k, v of shape (B, T, C); returns ``attn_out`` of it."""
        b, t, c = q.shape
        nh, nkv, hs = self.config.n_heads, self.config.effective_n_kv_heads, self.head_dim
        q = q.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(b, t, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(b, t, nkv, hs).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        if nkv != nh:  # like LLaDA: repeat KV heads before the SDPA call
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_bias, dropout_p=0.0, is_causal=False
        )  # (B, nh, T, hs)
        att = att.transpose(1, 2).contiguous().view(b, t, c)
        return self.attn_out(att)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        h = self.attn_norm(x)
        x = x + self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias)
        h = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """The inner model: ``transformer`` = {wte, blocks, ln_f, ff_out}."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                blocks=nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False),
            )
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(config.d_model))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalLMOutputWithPast:
        x = self.transformer.wte(input_ids)  # (B, T, C)
        bias = None
        if attention_mask is not None:
            # (B, T) padding mask, 1 = keep -> additive bias on the keys, (B, 1, 1, T)
            keep = attention_mask.to(device=x.device, dtype=x.dtype)[:, None, None, :]
            bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for block in self.transformer.blocks:
            x = block(x, bias)
        logits = self.transformer.ff_out(self.transformer.ln_f(x))
        return CausalLMOutputWithPast(logits=logits)


class LLaDAModelLM(nn.Module):
    """The outer model; like LLaDA's, it calls ``self.model.forward(...)`` directly (no ``__call__``),
    so forward hooks on ``.model`` never fire."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> CausalLMOutputWithPast:
        if kwargs:
            raise ValueError(f"TinyLLaDA takes only input_ids and attention_mask; got {sorted(kwargs)}.")
        return self.model.forward(input_ids=input_ids, attention_mask=attention_mask)


TinyLLaDA = LLaDAModelLM


def tiny_llada(seed: int = 0, **overrides: Any) -> LLaDAModelLM:
    """Tiny LLaDA-structured model (2 layers, d_model 32, 4 heads, vocab 64, ``mask_token_id = 63``).

    Args:
        seed: seed for the weight initialisation.
        **overrides: :class:`LLaDAConfig` fields to change (e.g. ``n_kv_heads=2`` for GQA).

    Returns:
        An eval-mode float32 :class:`LLaDAModelLM`.
    """
    config = LLaDAConfig(**overrides)
    return _build(lambda: LLaDAModelLM(config), seed)
