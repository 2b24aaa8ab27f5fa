"""Prompts to the text encoder's conditioning through compel: A1111 weights (read by `imagine.prompts`) and
prompts beyond the text encoder's 77 tokens, encoded in chunks of 75 instead of cut.

A prompt without weights gives exactly what the pipeline's own `encode_prompt` gives (compel skips the
weighting when every weight is 1), so turning this on changes no image but those that use it.
"""

from __future__ import annotations

import torch

from imagine.prompts import weighted_fragments


class PromptEncoder:
    def __init__(self, pipe) -> None:
        from compel import Compel

        self.tokenizer = pipe.tokenizer
        # compel tokenizes a long prompt whole, on purpose, and encodes it in chunks: the tokenizer's warning
        # (once per process) that such a sequence "will result in indexing errors" would mislead the log's reader.
        self.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.compel = Compel(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False, device=pipe.device
        )

    def chunks(self, text: str) -> int:
        """How many chunks the prompt's conditioning takes (compel splits a long prompt between phrases, each
        chunk with its start and end markers): jobs batch only with equal counts, since padding a conditioning
        with empty chunks changes its image."""
        fragments = weighted_fragments(text) or [("", 1.0)]
        tokens, _, _ = self.compel.conditioning_provider.get_token_ids_and_expand_weights(
            [fragment for fragment, _ in fragments], [weight for _, weight in fragments], device="cpu"
        )
        return len(tokens) // self.tokenizer.model_max_length

    def encode(self, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditionings of a batch's prompts and negative prompts, each row padded to the longest."""
        conditionings = [self._encode(text) for text in [*prompts, *negative_prompts]]
        padded = torch.cat(self.compel.pad_conditioning_tensors_to_same_length(conditionings))
        return padded[: len(prompts)], padded[len(prompts) :]

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        fragments = weighted_fragments(text) or [("", 1.0)]
        return self.compel.conditioning_provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[[fragment for fragment, _ in fragments]],
            fragment_weights_batch=[[weight for _, weight in fragments]],
            device=self.compel.device,
        )
