"""Batched greedy / beam-search decoding from the visual query embeddings.

Own KV-cached beam search instead of HF `generate`: the input is a mix of token embeddings and soft query tokens,
P-Tuning v2 adds a pre-filled prefix cache, and the LM head is applied to the last position only; one small loop
handles all three strategies the same way. num_beams = 1 is greedy decoding.

Scoring follows HF conventions: repetition penalty on the logits of already generated tokens (divide positive,
multiply negative), a hypothesis ends at the LM's end token, a sample stops once it has num_beams finished
hypotheses, and the best hypothesis maximises sum(log p) / length.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from medvlm.config import GenerateConfig
from medvlm.model.medvlm import MedVLM


def _apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or tokens.shape[1] == 0:
        return logits
    seen = logits.gather(1, tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, tokens, seen)


@torch.no_grad()
def generate_ids(model: MedVLM, trunk_features: torch.Tensor, gen: GenerateConfig, prompt_index: int = 0,
                 ) -> tuple[list[list[int]], torch.Tensor | None]:
    """Token ids of the best hypothesis per sample (end token excluded) and label probabilities (or None)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    queries, disc_logits = model.visual_queries(trunk_features.to(device))
    batch, beams = queries.shape[0], gen.num_beams
    # beams hold indices into the output vocabulary (== token ids unless the vocabulary is closed)
    eos = int(model.output_index(torch.tensor([model.layout.eos], device=device)))
    pre = torch.tensor(model.layout.pre, dtype=torch.long, device=device)
    post = torch.tensor(model.layout.posts[prompt_index], dtype=torch.long, device=device)
    embeds = torch.cat([model.embed_ids(pre).unsqueeze(0).expand(batch, -1, -1), queries.to(model.embed_ids(post).dtype),
                        model.embed_ids(post).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    embeds = embeds.repeat_interleave(beams, dim=0)  # (B*K, L, D), beams of a sample are adjacent
    rows, length = embeds.shape[:2]
    cache = model.prefix_cache(rows, embeds.dtype) or DynamicCache()
    offset = model.prefix_length()
    mask = torch.ones(rows, offset + length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).unsqueeze(0).expand(rows, -1)
    hidden = model.run_decoder(embeds, mask, positions, cache)[:, -1]

    beam_scores = torch.zeros(batch, beams, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first one only
    tokens = torch.empty(rows, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(gen.max_new_tokens):
        logits = _apply_repetition_penalty(model.lm_head(hidden).float(), tokens, gen.repetition_penalty)
        scores = (beam_scores.view(-1, 1) + torch.log_softmax(logits, dim=-1)).view(batch, -1)
        top_scores, top_index = scores.topk(2 * beams, dim=1)
        vocab = logits.shape[-1]
        next_beam = torch.zeros(batch, beams, dtype=torch.long, device=device)
        next_token = torch.full((batch, beams), eos, dtype=torch.long, device=device)
        next_score = torch.full((batch, beams), float("-inf"), device=device)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                beam, token = divmod(index, vocab)
                if token == eos:
                    if rank < beams and score > float("-inf"):
                        hyp = tokens[b * beams + beam].tolist()
                        finished[b].append((score / max(1, len(hyp) + 1), hyp))
                    continue
                next_beam[b, kept], next_token[b, kept], next_score[b, kept] = beam, token, score
                kept += 1
                if kept == beams:
                    break
            done[b] = len(finished[b]) >= beams
        if all(done):
            break
        if step == gen.max_new_tokens - 1:  # no room for another token: unfinished beams become hypotheses
            for b in range(batch):
                if not done[b]:
                    for k in range(beams):
                        if next_score[b, k] > float("-inf"):
                            hyp = tokens[b * beams + int(next_beam[b, k])].tolist() + [int(next_token[b, k])]
                            finished[b].append((float(next_score[b, k]) / len(hyp), hyp))
            break
        beam_index = (next_beam + torch.arange(batch, device=device).unsqueeze(1) * beams).view(-1)
        cache.reorder_cache(beam_index)
        tokens = torch.cat([tokens[beam_index], next_token.view(-1, 1)], dim=1)
        beam_scores = next_score
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = torch.full((rows, 1), length + step, dtype=torch.long, device=device)
        next_embeds = model.embed_ids(model.output_token(next_token.view(-1, 1)))
        hidden = model.run_decoder(next_embeds, mask, positions, cache)[:, -1]
    best = [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
    best = [model.output_token(torch.tensor(ids, dtype=torch.long)).tolist() if ids else [] for ids in best]
    model.train(was_training)
    probs = torch.sigmoid(disc_logits.float()).cpu() if disc_logits is not None else None
    return best, probs


def generate_reports(model: MedVLM, trunk_features: torch.Tensor, gen: GenerateConfig,
                     batch_size: int | None = None) -> tuple[list[str], torch.Tensor | None]:
    """Reports (decoded text) and label probabilities for cached trunk features, in batches."""
    size = batch_size or gen.batch_size
    texts, probs = [], []
    for start in range(0, len(trunk_features), size):
        ids, p = generate_ids(model, trunk_features[start : start + size], gen)
        texts.extend(model.layout.decode(x) for x in ids)
        if p is not None:
            probs.append(p)
    return texts, (torch.cat(probs) if probs else None)
