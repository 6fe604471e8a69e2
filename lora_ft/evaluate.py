"""Evaluation stage: held-out loss of base vs base+adapter (and, in `loraft eval`, generation metrics).

Loss is token-weighted (sum of token NLL over the number of trained tokens), so a batch of short
rows does not count as much as a batch of long ones; the base model is measured with the adapter
disabled in the same process, so both numbers see exactly the same tokens.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch


@torch.no_grad()
def heldout_loss(model, encoded, *, pad_token_id: int, batch_size: int = 8, disable_adapter: bool = False) -> dict:
    """Token-weighted mean NLL and perplexity over encoded rows (input_ids + labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    context = model.disable_adapter() if disable_adapter else nullcontext()
    with context:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            input_ids, labels, attention = _pad(batch, pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((shift_labels != -100).sum())
    if was_training:
        model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": total_tokens, "rows": len(encoded)}


def _pad(batch, pad_token_id: int):
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention[row, :n] = 1
    return input_ids, labels, attention
