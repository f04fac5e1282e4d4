"""Paged attention over a ragged packed batch (decode tokens and context chunks together)."""

from __future__ import annotations

import torch

from kiln.plugins.registry import Plugin, plugin

ATTENTION_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
    "Tensor query_start_loc, int max_query_len, int max_seq_len, float scale, int sliding_window) -> Tensor"
)


@plugin("paged_attention", kind="attention")
class PagedAttention(Plugin):
    """Causal attention of each sequence's new tokens to its whole KV (cached prefix + this step).

    q [T, Hq, D] packed; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [S, max_blocks]
    int32; seq_lens [S] int32 = KV length after this step (this step's K/V already written);
    query_start_loc [S+1] int32. Query i of sequence s sits at position seq_len - q_len + i and sees
    keys at positions <= its own (and > position - sliding_window when sliding_window > 0).
    Returns [T, Hq, D] in q's dtype.
    """

    schema = ATTENTION_SCHEMA

    def shape_dtype_inference(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        return torch.empty_like(q)

    def forward(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        from kiln.plugins.triton.paged_attention import paged_attention

        return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                               max_query_len, max_seq_len, scale, sliding_window)  # fmt: skip

    def forward_into(self, out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                     max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        from kiln.plugins.triton.paged_attention import paged_attention

        paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                        max_seq_len, scale, sliding_window, out=out)  # fmt: skip

    def reference(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                  max_query_len, max_seq_len, scale, sliding_window):  # fmt: skip
        num_q_heads, head_dim = q.shape[1], q.shape[2]
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_q_heads // num_kv_heads
        out = torch.empty_like(q)
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        for s, kv_len in enumerate(lens):
            q_s = q[starts[s] : starts[s + 1]]  # [L, Hq, D]
            q_len = q_s.shape[0]
            if q_len == 0:
                continue
            num_blocks = -(-kv_len // block_size)
            blocks = block_tables[s, :num_blocks].long()
            k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len]  # [N, Hkv, D]
            v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len]
            k = k.repeat_interleave(group, dim=1)  # [N, Hq, D]
            v = v.repeat_interleave(group, dim=1)
            scores = torch.einsum("lhd,nhd->hln", q_s.float(), k.float()) * scale  # [Hq, L, N]
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            k_pos = torch.arange(kv_len, device=q.device)[None, :]
            visible = k_pos <= q_pos
            if sliding_window > 0:
                visible &= k_pos > q_pos - sliding_window
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[starts[s] : starts[s + 1]] = torch.einsum("hln,nhd->lhd", probs, v.float()).to(q.dtype)
        return out
