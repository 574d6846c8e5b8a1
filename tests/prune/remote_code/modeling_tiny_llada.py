"""A remote-code checkpoint like LLaDA's: config and model in one file, loaded with trust_remote_code.

Self-contained on purpose (a checkpoint's code file imports only installed packages). Module names
follow LLaDA's ``modeling_llada.py`` (``model.transformer.blocks.N.{q_proj, k_proj, v_proj, attn_out,
ff_proj, up_proj, ff_out}``); as in LLaDA, the head size is the projection width over the config's
head count, and the config has no head-size field. Attention is bidirectional (SDPA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        mlp_hidden_size: int = 64,
        mask_token_id: int = 63,
        max_sequence_length: int = 128,
        **kwargs,
    ) -> None:
        self.vocab_size, self.d_model, self.n_heads = vocab_size, d_model, n_heads
        self.n_layers, self.mlp_hidden_size = n_layers, mlp_hidden_size
        self.mask_token_id, self.max_sequence_length = mask_token_id, max_sequence_length
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: TinyLLaDAConfig) -> None:
        super().__init__()
        self.config = config
        d, h = config.d_model, config.mlp_hidden_size
        self.attn_norm, self.ff_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, t, c = q.shape
        nh = self.config.n_heads
        nkv = getattr(self.config, "n_kv_heads", None) or nh
        hs = c // nh  # as in LLaDA: the head size is the width over the config's head count
        q = q.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (x.view(b, t, nkv, hs).transpose(1, 2) for x in (k, v))  # (B, nkv, T, hs)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.attn_out(att.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn_norm(x)
        x = x + self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config: TinyLLaDAConfig) -> None:
        super().__init__(config)
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                blocks=nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model),
                ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False),
            )
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs
    ) -> CausalLMOutputWithPast:
        t = self.model.transformer
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x)
        return CausalLMOutputWithPast(logits=t.ff_out(t.ln_f(x)))
