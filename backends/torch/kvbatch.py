"""The running batch's shared device state, changed all or nothing.

One DynamicCache of shape [B, kv_heads, L, head_dim] per layer, kept LEFT-padded: a row shorter than L
has zero keys/values in its first columns, hidden by a 2-D attention mask [B, L]. Next to it, each row's
next input token and position id live on the device ([B] each), so a decode step starts without
building tensors from Python lists.

Both changes of shape are all or nothing, without a second copy of the cache in flight:
- `merged` (requests prefilled together join) grows the cache one layer at a time; if a layer cannot be
  allocated, the layers already grown are cut back to views of exactly their old contents and the error
  propagates: the running batch is as it was, and only the joining request fails;
- `selected` (rows leave) builds the small tensors first, then compacts the cache in place (no allocation).
The transient memory is one layer's copy of the batch at a join, the same as DynamicCache's own per-step
concatenation (both are in the memory ledger's activation allowance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] int64, 0 = padding
    pads: list[int]  # leading padding columns per row (host copy: decides whether a mask is needed)
    next_ids: torch.Tensor  # [B] int64: the token each row feeds next
    positions: torch.Tensor  # [B] int64: that token's position id (the row's real length)

    @property
    def size(self) -> int:
        return len(self.pads)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def prefill_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each [k, longest], for prefilling `prompts` together,
    left-padded so that every row's last position is its real last token (one upload)."""
    longest = max(len(p) for p in prompts)
    rows = [[0] * (longest - len(p)) + list(p) for p in prompts]
    masks = [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    both = torch.tensor([rows, masks], dtype=torch.long).to(device)
    ids, mask = both[0], both[1]
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    return ids, mask, positions


def group(cache: DynamicCache, prompt_lens: list[int], first_tokens: list[int]) -> KVBatch:
    """The batch state of requests prefilled together (one row each, left-padded to the longest); padding
    columns of the cache are zeroed (a padded query attends to nothing, which may leave NaN there)."""
    device = cache.layers[0].keys.device
    longest = max(prompt_lens)
    pads = [longest - n for n in prompt_lens]
    small = torch.tensor([first_tokens, prompt_lens, pads], dtype=torch.long).to(device)
    mask = (torch.arange(longest, device=device)[None, :] >= small[2][:, None]).long()
    if any(pads):
        hidden = (mask == 0)[:, None, :, None]
        for layer in cache.layers:
            layer.keys.masked_fill_(hidden, 0)
            layer.values.masked_fill_(hidden, 0)
    return KVBatch(cache, mask, pads, small[0].clone(), small[1].clone())


def merged(batch: KVBatch | None, new: KVBatch) -> KVBatch:
    """The batch with the rows of `new` (requests just prefilled) appended at the end; all or nothing. The
    cache grows layer by layer (one layer's copy in flight, never a second copy of the whole cache); if a
    layer fails, the layers already grown are cut back to their old rows and columns (views of the new
    tensors: no allocation), and the error propagates."""
    if batch is None:
        return new
    rows, cur_len = batch.size, batch.length
    total = max(cur_len, new.length)
    grow, new_pad = total - cur_len, total - new.length
    # the small tensors first: failing here changes nothing
    mask = torch.cat(
        [F.pad(batch.mask, (grow, 0)) if grow else batch.mask, F.pad(new.mask, (new_pad, 0)) if new_pad else new.mask]
    )
    next_ids = torch.cat([batch.next_ids, new.next_ids])
    positions = torch.cat([batch.positions, new.positions])
    grown = 0
    try:
        for layer, new_layer in zip(batch.cache.layers, new.cache.layers, strict=True):
            layer.keys = _stack_rows(layer.keys, new_layer.keys, grow, new_pad)
            layer.values = _stack_rows(layer.values, new_layer.values, grow, new_pad)
            grown += 1
    except BaseException:
        for layer in batch.cache.layers[:grown]:
            layer.keys, layer.values = layer.keys[:rows, :, grow:], layer.values[:rows, :, grow:]
        layer = batch.cache.layers[grown]
        if layer.keys.shape[0] != rows:  # keys grew, values did not
            layer.keys = layer.keys[:rows, :, grow:]
        raise
    pads = [p + grow for p in batch.pads] + [p + new_pad for p in new.pads]
    return KVBatch(batch.cache, mask, pads, next_ids, positions)


def _stack_rows(old: torch.Tensor, new: torch.Tensor, grow: int, new_pad: int) -> torch.Tensor:
    """[B, H, L, D] and [k, H, l, D] -> [B + k, H, max(L, l), D], each left-padded with zeros: one allocation."""
    b, heads, length, dim = old.shape
    out = old.new_zeros((b + new.shape[0], heads, length + grow, dim))
    out[:b, :, grow:] = old
    out[b:, :, new_pad:] = new
    return out


def selected(batch: KVBatch, keep: list[int]) -> KVBatch:
    """The batch with only the rows at `keep` (ascending); leading columns that are padding for every kept row
    are cut. The small tensors are built first (failing there changes nothing); the cache is then compacted
    in place (kept rows copied down, then a view), which allocates nothing and so cannot run out of memory."""
    pads = [batch.pads[i] for i in keep]
    cut = min(pads)
    n = len(keep)
    if keep == list(range(n)):
        mask, next_ids, positions = batch.mask[:, cut:][:n], batch.next_ids[:n], batch.positions[:n]
    else:
        idx = torch.tensor(keep, dtype=torch.long).to(batch.mask.device)
        mask, next_ids, positions = batch.mask[idx, cut:], batch.next_ids[idx], batch.positions[idx]
    for layer in batch.cache.layers:
        for j, src in enumerate(keep):  # keep is ascending, so row j's old content has already moved
            if src != j:
                layer.keys[j].copy_(layer.keys[src])
                layer.values[j].copy_(layer.values[src])
        layer.keys, layer.values = layer.keys[:n, :, cut:], layer.values[:n, :, cut:]
    return KVBatch(batch.cache, mask, [p - cut for p in pads], next_ids, positions)


def step_mask(batch: KVBatch) -> torch.Tensor:
    """The attention mask of the next decode step: one more real column for every row."""
    return torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)


def rollback(batch: KVBatch) -> None:
    """Undo a decode step that failed part-way: layers that ran before the failure appended a column."""
    batch.cache.crop(batch.length)
