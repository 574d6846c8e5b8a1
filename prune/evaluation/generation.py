"""``generate_until`` of the lm-eval model: the diffusion sampler (:func:`attnprobe.generate`) or greedy
autoregressive decoding, cut at EOS and at the first stop sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import attnprobe
from prune.evaluation.draws import forward_logits


class Generation:
    """Mixin of :class:`prune.evaluation.harness.AttnprobeLM`: reads its model, tokenizer, lengths and
    sampler settings (``max_gen_toks``, ``block_length``, ``gen_steps``, ``seed``)."""

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate after each context (diffusion sampler or greedy AR) and cut at the stop sequences."""
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm or len(requests) < 8):
            context, gen_kwargs = request.args
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    @torch.no_grad()
    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        length = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
        ids = self._prefix() + self._encode(context)
        length = min(length, self.max_length - len(self._prefix()) - 1)
        keep = len(self._prefix())
        excess = len(ids) + length - self.max_length
        if excess > 0:
            ids = ids[:keep] + ids[keep + excess :]
        prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
        if self.diffusion:
            new = self._diffusion_generate(prompt, length, temperature)
        else:
            new = self._ar_generate(prompt, length, until)
        if self.eos_token_id is not None and self.eos_token_id in new:
            new = new[: new.index(self.eos_token_id)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def _diffusion_generate(self, prompt: Tensor, length: int, temperature: float) -> list[int]:
        block = min(self.block_length or length, length)
        length = length // block * block  # whole blocks
        blocks = length // block
        steps = max(self.gen_steps or length, blocks) // blocks * blocks
        gen = torch.Generator(device=prompt.device).manual_seed(self.seed)
        ids = attnprobe.generate(
            self.model,
            prompt,
            mask_token_id=int(self.mask_token_id),
            steps=steps,
            gen_length=length,
            block_length=block,
            temperature=temperature,
            generator=gen,
        )
        return ids[0, prompt.shape[1] :].tolist()

    def _ar_generate(self, prompt: Tensor, length: int, until: list[str]) -> list[int]:
        ids, new = prompt, []
        for _ in range(length):
            token = int(forward_logits(self.model, ids)[0, -1].argmax())
            new.append(token)
            if token == self.eos_token_id:
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if any(stop and stop in text for stop in until):
                break
        return new
