"""Prompt logprobs of context chunks, computed in bounded slices of rows.

Convention. A chunk of sequence s covers positions ``c .. c+n-1``; its PromptLogprobs has
``start = c`` and entry i scores the token at position ``c + i + 1`` from the hidden state at
position ``c + i``. The chunk's last position scores the first token of the *next* chunk, which the
engine knows from the prompt recorded when the sequence took its slot (``SlotInit``); the chunk that
ends the prompt has no next token, so it scores ``n - 1`` tokens. Concatenating a prompt's chunks
therefore gives exactly one logprob for each prompt token 1 .. P-1 (token 0 has no context).
If a slot's prompt was never announced, chunks score only the tokens inside them (n - 1 each).

Logits are computed for at most ``max_slice_elems / V`` rows at a time, never [P, V] for a long prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kiln.executor.messages import PromptLogprobs, ScheduledBatch, SlotInit

DEFAULT_SLICE_ELEMS = 1 << 24  # 64 MiB of float32 logits per slice


class PromptLogprobsComputer:
    def __init__(
        self,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
        vocab_size: int,
        max_slice_elems: int = DEFAULT_SLICE_ELEMS,
    ) -> None:
        self.compute_logits = compute_logits
        self.vocab_size = vocab_size
        self.rows_per_slice = max(1, max_slice_elems // vocab_size)
        # slot -> every token known for the sequence in it (prompt, then outputs of a resumed sequence);
        # kept only for sequences that asked for prompt logprobs, dropped after their last prompt chunk.
        self._known: dict[int, np.ndarray] = {}

    def record_slots(self, inits: list[SlotInit]) -> None:
        for init in inits:
            if init.params.prompt_logprobs is None:
                self._known.pop(init.slot, None)
            else:
                self._known[init.slot] = np.asarray(
                    list(init.prompt_token_ids) + list(init.output_token_ids), dtype=np.int64
                )

    def compute(self, batch: ScheduledBatch, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """hidden [T, H]: final hidden states of the packed step."""
        num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        query_start = np.concatenate(([0], np.cumsum(num_new)))
        input_ids = np.asarray(batch.input_ids, dtype=np.int64)
        out: list[PromptLogprobs] = []
        for row, k in zip(batch.prompt_logprob_rows.tolist(), batch.prompt_logprob_k.tolist(), strict=True):
            first, n = int(query_start[row]), int(num_new[row])
            start = int(batch.num_computed[row])
            slot = int(batch.slots[row])
            targets = input_ids[first + 1 : first + n]  # tokens c+1 .. c+n-1 are in the chunk
            known = self._known.get(slot)
            if known is not None:
                assert np.array_equal(known[start : start + n], input_ids[first : first + n]), (
                    f"slot {slot}: the chunk's tokens differ from the prompt recorded at admission"
                )
                if start + n < known.size:
                    targets = np.append(targets, known[start + n])
                else:
                    self._known.pop(slot)  # the prompt is done
            out.append(self._score(int(batch.seq_ids[row]), start, hidden[first : first + targets.size],
                                   targets, int(k)))  # fmt: skip
        return out

    def _score(
        self, seq_id: int, start: int, hidden: torch.Tensor, targets: np.ndarray, k: int
    ) -> PromptLogprobs:
        num, k = int(targets.size), min(k, self.vocab_size)
        token_lp = np.empty(num, dtype=np.float32)
        top_ids = np.empty((num, k), dtype=np.int32)
        top_lp = np.empty((num, k), dtype=np.float32)
        tgt = torch.from_numpy(targets).to(hidden.device)
        for lo in range(0, num, self.rows_per_slice):
            hi = min(num, lo + self.rows_per_slice)
            logprobs = torch.log_softmax(self.compute_logits(hidden[lo:hi]).float(), dim=-1)  # [l, V] fp32
            token_lp[lo:hi] = logprobs.gather(1, tgt[lo:hi, None]).squeeze(1).cpu().numpy()
            if k > 0:
                values, ids = logprobs.topk(k, dim=-1)  # [l, k], best first
                top_lp[lo:hi] = values.cpu().numpy()
                top_ids[lo:hi] = ids.to(torch.int32).cpu().numpy()
        return PromptLogprobs(seq_id=seq_id, start=start, token_logprobs=token_lp, top_ids=top_ids,
                              top_logprobs=top_lp)  # fmt: skip
