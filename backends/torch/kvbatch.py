"""The running batch's shared device state, changed all or nothing.

One DynamicCache of shape [B, kv_heads, L, head_dim] per layer, kept LEFT-padded: a row shorter than L
has zero keys/values in its first columns, hidden by a 2-D attention mask [B, L]. Next to it, each row's
next input token and position id live on the device ([B] each), so a decode step starts without
building tensors from Python lists.

`merged` (a prefilled request joins) and `selected` (rows leave) build every new tensor first and only
then `commit` them; an error while building (out of memory copying the cache) leaves the running batch
exactly as it was, so only the request that was joining or the rows that were leaving are concerned.
The price is a transient second copy of the cache during a join or a compaction (in the memory ledger's
activation allowance).
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


@dataclass
class _Pending:
    """New tensors for a batch, built but not yet installed."""

    cache: DynamicCache
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    pads: list[int]
    next_ids: torch.Tensor
    positions: torch.Tensor

    def commit(self) -> KVBatch:
        """Install the new tensors (assignments only: nothing here allocates or can fail)."""
        for layer, (k, v) in zip(self.cache.layers, self.layers, strict=True):
            layer.keys, layer.values = k, v
        return KVBatch(self.cache, self.mask, self.pads, self.next_ids, self.positions)


def merged(batch: KVBatch | None, cache: DynamicCache, prompt_len: int, first_token: int) -> _Pending:
    """The batch with a freshly prefilled request (`cache` of one row, `prompt_len` long) appended as the
    last row. The request's own cache object receives the merged tensors at commit."""
    device = cache.layers[0].keys.device
    token = torch.tensor([first_token, prompt_len], dtype=torch.long).to(device)
    if batch is None:
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        mask = torch.ones((1, prompt_len), dtype=torch.long, device=device)
        return _Pending(cache, layers, mask, [0], token[:1], token[1:])
    cur_len = batch.length
    total = max(cur_len, prompt_len)
    grow, new_pad = total - cur_len, total - prompt_len
    layers = []
    for layer, new_layer in zip(batch.cache.layers, cache.layers, strict=True):
        k, v = layer.keys, layer.values
        if grow:
            k, v = F.pad(k, (0, 0, grow, 0)), F.pad(v, (0, 0, grow, 0))
        nk, nv = new_layer.keys, new_layer.values
        if new_pad:
            nk, nv = F.pad(nk, (0, 0, new_pad, 0)), F.pad(nv, (0, 0, new_pad, 0))
        layers.append((torch.cat([k, nk]), torch.cat([v, nv])))
    new_row = torch.ones((1, total), dtype=torch.long, device=device)
    new_row[:, :new_pad] = 0
    mask = F.pad(batch.mask, (grow, 0)) if grow else batch.mask
    return _Pending(
        cache,
        layers,
        torch.cat([mask, new_row]),
        [p + grow for p in batch.pads] + [new_pad],
        torch.cat([batch.next_ids, token[:1]]),
        torch.cat([batch.positions, token[1:]]),
    )


def selected(batch: KVBatch, keep: list[int]) -> _Pending:
    """The batch with only the rows at `keep`; leading columns that are padding for every kept row are cut."""
    pads = [batch.pads[i] for i in keep]
    cut = min(pads)
    if keep == list(range(keep[0], keep[-1] + 1)):  # a contiguous run of rows: views, no copy
        rows = slice(keep[0], keep[-1] + 1)
        layers = [(layer.keys[rows, :, cut:], layer.values[rows, :, cut:]) for layer in batch.cache.layers]
        mask, next_ids, positions = batch.mask[rows, cut:], batch.next_ids[rows], batch.positions[rows]
    else:
        idx = torch.tensor(keep, dtype=torch.long).to(batch.mask.device)
        layers = [(layer.keys[idx, :, cut:], layer.values[idx, :, cut:]) for layer in batch.cache.layers]
        mask, next_ids, positions = batch.mask[idx, cut:], batch.next_ids[idx], batch.positions[idx]
    return _Pending(batch.cache, layers, mask, [p - cut for p in pads], next_ids, positions)


def step_mask(batch: KVBatch) -> torch.Tensor:
    """The attention mask of the next decode step: one more real column for every row."""
    return torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)


def rollback(batch: KVBatch) -> None:
    """Undo a decode step that failed part-way: layers that ran before the failure appended a column."""
    batch.cache.crop(batch.length)
