"""A decode graph's inputs from its static step rows: one Triton kernel on the GPU, torch on the CPU.

From the rows (input ids, positions, slots, KV lengths, previous-sample rows; see ``cuda_graphs.py``)
a decode step needs its input tokens (the previous step's sample where overlap scheduling left a row
unknown), its block-table rows gathered by slot (the null block for padded rows), the KV write slot of
each token and the KV lengths in int32. In torch that is ~15 small kernels, each ~1.5 us plus a launch
boundary inside the graph: ~40 us of a 1.2 ms batch-1 step on a 1B model. One kernel, one program a
row, does all of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.triton._common import next_pow2, pdl_args, pdl_trigger, pdl_wait

# rows of the static input buffer, and the same as constexprs for the kernel
INPUT_IDS, POSITIONS, SLOTS, SEQ_LENS, PREV_ROWS = range(5)
_IDS, _POS, _SLOT, _SEQ, _PREV = (tl.constexpr(i) for i in range(5))
_MAX_TABLE_BLOCK = 4096  # block-table entries copied per loop step


def decode_inputs(
    rows: torch.Tensor,  # [5, b] int64: the rows above
    prev_tokens: torch.Tensor,  # [R] int64: the previous step's samples, indexed by PREV_ROWS
    block_table: torch.Tensor,  # [S, max_blocks] int32: the engine's persistent table, indexed by slot
    tokens_per_block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [b] int64, slot_mapping [b] int64 (-1: no KV write), block_tables [b, max_blocks]
    int32 (all null blocks for a row without a slot), seq_lens [b] int32)."""
    if rows.is_cuda:
        return _decode_inputs_triton(rows, prev_tokens, block_table, tokens_per_block)
    return decode_inputs_reference(rows, prev_tokens, block_table, tokens_per_block)


def decode_inputs_reference(
    rows: torch.Tensor, prev_tokens: torch.Tensor, block_table: torch.Tensor, tokens_per_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    positions, slots, prev = rows[POSITIONS], rows[SLOTS], rows[PREV_ROWS]
    # overlap scheduling: a token sampled by the previous step is known on the device only
    input_ids = torch.where(prev >= 0, prev_tokens.index_select(0, prev.clamp(min=0)), rows[INPUT_IDS])
    valid = slots >= 0
    tables = block_table.index_select(0, slots.clamp(min=0))  # [b, max_blocks] int32
    tables = torch.where(valid[:, None], tables, 0)  # padded rows: the null block
    tpb = tokens_per_block
    blocks = tables.gather(1, (positions // tpb)[:, None]).squeeze(1).to(torch.int64)
    slot_mapping = torch.where(valid, blocks * tpb + positions % tpb, -1)
    return input_ids, slot_mapping, tables, rows[SEQ_LENS].to(torch.int32)


@triton.jit
def _decode_inputs_kernel(
    rows_ptr, stride_rows, prev_tokens_ptr, block_table_ptr, stride_bt, max_blocks,
    ids_ptr, slot_mapping_ptr, tables_ptr, stride_t, seq_lens_ptr,
    TOKENS_PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    i = tl.program_id(0)
    token = tl.load(rows_ptr + _IDS * stride_rows + i)
    pos = tl.load(rows_ptr + _POS * stride_rows + i)
    slot = tl.load(rows_ptr + _SLOT * stride_rows + i)
    seq_len = tl.load(rows_ptr + _SEQ * stride_rows + i)
    prev = tl.load(rows_ptr + _PREV * stride_rows + i)
    token = tl.where(prev >= 0, tl.load(prev_tokens_ptr + tl.maximum(prev, 0)), token)
    valid = slot >= 0
    src = block_table_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bt
    dst = tables_ptr + i.to(tl.int64) * stride_t
    for j0 in range(0, max_blocks, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        in_row = j < max_blocks
        tl.store(dst + j, tl.load(src + j, mask=in_row & valid, other=0), mask=in_row)
    block = tl.load(src + pos // TOKENS_PER_BLOCK, mask=valid, other=0).to(tl.int64)
    tl.store(ids_ptr + i, token)
    tl.store(slot_mapping_ptr + i, tl.where(valid, block * TOKENS_PER_BLOCK + pos % TOKENS_PER_BLOCK, -1))
    tl.store(seq_lens_ptr + i, seq_len.to(tl.int32))


def _decode_inputs_triton(
    rows: torch.Tensor, prev_tokens: torch.Tensor, block_table: torch.Tensor, tokens_per_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if rows.dim() != 2 or rows.shape[0] != 5 or rows.stride(1) != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be [5, b] int64 contiguous in b, got {tuple(rows.shape)} {rows.dtype}")
    if block_table.stride(1) != 1 or block_table.dtype != torch.int32:
        raise ValueError(
            f"block_table must be int32 and contiguous along its blocks, got {block_table.dtype} with "
            f"strides {tuple(block_table.stride())}"
        )
    b, max_blocks = rows.shape[1], block_table.shape[1]
    dev = rows.device
    input_ids = torch.empty(b, dtype=torch.int64, device=dev)
    slot_mapping = torch.empty(b, dtype=torch.int64, device=dev)
    tables = torch.empty(b, max_blocks, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(b, dtype=torch.int32, device=dev)
    if b:
        _decode_inputs_kernel[(b,)](
            rows, rows.stride(0), prev_tokens, block_table, block_table.stride(0), max_blocks,
            input_ids, slot_mapping, tables, tables.stride(0), seq_lens,
            TOKENS_PER_BLOCK=tokens_per_block, BLOCK=min(next_pow2(max_blocks), _MAX_TABLE_BLOCK),
            num_warps=4, **pdl_args(dev),
        )  # fmt: skip
    return input_ids, slot_mapping, tables, seq_lens
