"""labeler.mode finetune: all-MiniLM-L6-v2 fine-tuned with a multi-label classification head (BCE over labels).

The result has the frozen mode's shape, so `medvlm.labeler.Labeler` reads either without knowing which trained it:
the tuned encoder is saved under <labeler.out_dir>/encoder/ (transformers folder + tokenizer) and the head, a linear
layer over the same mean+max pooled token states, as heads.npz (coef, intercept). Probabilities =
sigmoid(pooled @ coef.T + intercept) in both modes.

Cost (README): on this project's shared 2-core CPU a step at batch 16 took 4-5 s; a GPU is used when present.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from medvlm.config import LabelerConfig
from medvlm.engine import Loop, StepOut, lr_schedule

ENCODER_DIR = "encoder"


def pool(states, mask):
    """Mean and max over real tokens, concatenated: (B, T, H), (B, T) -> (B, 2H). Shared with the frozen mode."""
    import torch

    mask = mask[..., None].to(states.dtype)
    mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    peak = states.masked_fill(mask == 0, float("-inf")).max(1).values
    return torch.cat([mean, peak], dim=1)


def finetune_encoder(texts: list[str], y: np.ndarray, lc: LabelerConfig, seed: int, out_dir: Path,
                     base_path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fine-tune MiniLM + a linear head on (texts, y); save the encoder to out_dir/encoder.

    Returns (coef (L, 2H), intercept (L,), facts: steps, seconds, seconds_per_step, device, final_loss)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    encoder = AutoModel.from_pretrained(base_path).to(device).train()
    n_labels = y.shape[1]
    head = torch.nn.Linear(2 * encoder.config.hidden_size, n_labels).to(device)
    prior = np.clip(y.mean(0), 1e-3, 1 - 1e-3)  # start from the label priors: early steps tune, not recalibrate
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32))
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": lc.finetune_lr},
                                   {"params": head.parameters(), "lr": lc.finetune_head_lr}], weight_decay=0.01)
    per_epoch = math.ceil(len(texts) / lc.finetune_batch_size)
    total = per_epoch * lc.finetune_epochs
    total = min(total, lc.finetune_max_steps) if lc.finetune_max_steps else total
    scheduler = lr_schedule(optimizer, total, shape="linear")
    targets = torch.as_tensor(y, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(len(texts))

    def step(epoch: int, in_epoch: int) -> StepOut:
        nonlocal order
        if in_epoch == 0:  # one generator for the whole run: epoch e's order is its e-th draw
            order = torch.randperm(len(texts), generator=gen)
        idx = order[in_epoch * lc.finetune_batch_size : (in_epoch + 1) * lc.finetune_batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=lc.max_length,
                          return_tensors="pt").to(device)
        logits = head(pool(encoder(**batch).last_hidden_state, batch["attention_mask"]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[idx].to(device))
        loss.backward()
        return StepOut(float(loss.detach()), len(idx))

    started = time.perf_counter()
    trained = [*encoder.parameters(), *head.parameters()]
    with Loop("labeler: fine-tune", total, per_epoch=per_epoch) as loop:
        loop.run(step, optimizer, scheduler, clip=lambda: torch.nn.utils.clip_grad_norm_(trained, 1.0))
    steps, loss_value = loop.step, loop.last.loss if loop.last is not None else float("nan")
    seconds = time.perf_counter() - started
    encoder_dir = out_dir / ENCODER_DIR
    encoder.eval().cpu().save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    facts = {"steps": steps, "seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(1, steps), 3),
             "device": device.type, "final_loss": round(loss_value, 5)}
    return (head.weight.detach().cpu().double().numpy(), head.bias.detach().cpu().double().numpy(), facts)
