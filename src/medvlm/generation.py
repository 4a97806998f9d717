"""Batched greedy / beam-search decoding from the visual soft tokens (Q-Former queries [+ disease clues]).

Own KV-cached beam search instead of HF `generate`: the input is a mix of token embeddings and soft query tokens,
P-Tuning v2 adds a pre-filled prefix cache, and the LM head is applied to the last position only; one small loop
handles all three strategies the same way. num_beams = 1 is greedy decoding.

Scoring follows HF conventions: repetition penalty on the logits of already generated tokens (divide positive,
multiply negative), a hypothesis ends at the LM's end token, a sample stops once it has num_beams finished
hypotheses, and the best hypothesis maximises sum(log p) / length.
"""

from __future__ import annotations

import torch

from medvlm.config import GenerateConfig
from medvlm.model.medvlm import MedVLM
from medvlm.progress import Advance, unwatched


def _apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or tokens.shape[1] == 0:
        return logits
    seen = logits.gather(1, tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, tokens, seen)


def _prompt_embeds(model: MedVLM, queries: torch.Tensor, posts: list[list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[pre][soft tokens][post] per sample -> (embeddings (B, L, D), mask (B, L), prompt lengths (B,)).

    Posts differ in length when they carry the predicted findings (model.prior_prompt). Shorter ones are padded
    on the right, between prompt and report: the pads are masked and each row's positions continue from its own
    length, so a row decodes as it would alone. (Left padding would leave pad rows with nothing to attend to.)
    """
    device = queries.device
    batch, width = queries.shape[0], max(len(p) for p in posts)
    ids = torch.full((batch, width), model.layout.pad, dtype=torch.long, device=device)
    for i, post in enumerate(posts):
        ids[i, : len(post)] = torch.tensor(post, dtype=torch.long, device=device)
    post_embeds = model.embed_ids(ids)
    pre = model.embed_ids(torch.tensor(model.layout.pre, dtype=torch.long, device=device))
    embeds = torch.cat([pre.unsqueeze(0).expand(batch, -1, -1), queries.to(post_embeds.dtype), post_embeds], dim=1)
    lengths = torch.tensor([len(model.layout.pre) + queries.shape[1] + len(p) for p in posts], device=device)
    mask = (torch.arange(embeds.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return embeds, mask, lengths


@torch.no_grad()
def generate_ids(model: MedVLM, trunk_features: torch.Tensor, gen: GenerateConfig, prompt_index: int = 0,
                 contexts: list[str] | None = None, indications: list[str | None] | None = None
                 ) -> tuple[list[list[int]], torch.Tensor | None]:
    """Token ids of the best hypothesis per sample (end token excluded) and label probabilities (or None).
    `contexts`: similar-case text per sample; None = from the model's retrieval index when it has one.
    `indications`: one clinical indication (or None) per sample, used with model.indication."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    queries, disc_logits = model.visual_queries(trunk_features.to(device))
    if contexts is None:
        contexts, _ = model.retrieval_contexts(trunk_features.to(device))
    batch, beams = queries.shape[0], gen.num_beams
    # beams hold indices into the output vocabulary (== token ids unless the vocabulary is closed)
    eos = int(model.output_index(torch.tensor([model.layout.eos], device=device)))
    embeds, prompt_mask, lengths = _prompt_embeds(model, queries, model.post_ids([prompt_index] * batch, disc_logits,
                                                                                   contexts=contexts, indications=indications))
    # (B*K, ...): beams of a sample are adjacent and share its prompt length, so beam reordering keeps `lengths`
    embeds, prompt_mask, lengths = (x.repeat_interleave(beams, dim=0) for x in (embeds, prompt_mask, lengths))
    rows = embeds.shape[0]
    cache = model.new_cache(rows, embeds.dtype)
    mask = torch.cat([prompt_mask.new_ones(rows, model.prefix_length()), prompt_mask], dim=1)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.run_decoder(embeds, mask, positions, cache)
    hidden = hidden[torch.arange(rows, device=device), lengths - 1]  # each row's last real prompt position

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
        positions = (lengths + step).view(-1, 1)
        next_embeds = model.embed_ids(model.output_token(next_token.view(-1, 1)))
        hidden = model.run_decoder(next_embeds, mask, positions, cache)[:, -1]
    best = [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
    best = [model.output_token(torch.tensor(ids, dtype=torch.long)).tolist() if ids else [] for ids in best]
    model.train(was_training)
    probs = torch.sigmoid(disc_logits.float()).cpu() if disc_logits is not None else None
    return best, probs


def generate_reports(model: MedVLM, trunk_features: torch.Tensor, gen: GenerateConfig,
                     batch_size: int | None = None, contexts: list[str] | None = None,
                     indications: list[str | None] | None = None,
                     advance: Advance = unwatched) -> tuple[list[str], torch.Tensor | None]:
    """Reports (decoded text) and label probabilities for cached trunk features, in batches. `contexts`: the
    similar-case text per sample when the caller already searched the retrieval index (None = generate_ids does);
    `indications`: one clinical indication (or None) per sample (model.indication); `advance` hears of every
    batch generated."""
    size = batch_size or gen.batch_size
    texts, probs = [], []
    for start in range(0, len(trunk_features), size):
        ids, p = generate_ids(model, trunk_features[start : start + size], gen,
                              contexts=contexts[start : start + size] if contexts is not None else None,
                              indications=indications[start : start + size] if indications is not None else None)
        texts.extend(model.layout.decode(x) for x in ids)
        if p is not None:
            probs.append(p)
        advance(len(ids))
    return texts, (torch.cat(probs) if probs else None)
