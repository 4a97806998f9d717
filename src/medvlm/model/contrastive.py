"""The contrastive image-report aligner of the pretrain_vision stage (TRRG), and what is computed with it.

Image side: the vision tail on cached trunk features, mean-pooled over its visual tokens, then a linear projection.
Report side: frozen report-encoder features (TextEncoder, e.g. medvlm.labeler.ReportEncoder) and a trainable linear
projection. Both land L2-normalised in one embedding space; the temperature is learned (CLIP's log-parameterised
scale, clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]) or fixed.

Loss: symmetric InfoNCE over the batch; rows whose report text is identical count as positives of each other.
Recall@k both ways with its chance level; zero-shot label similarity and CLIP's binary zero-shot classification
("findings of X" against "no findings of X") for the disease clues (medvlm.model.clues).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import PretrainConfig
from medvlm.model.encoder import VisionEncoder, view_tokens

RECALL_AT = (1, 5, 10)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0  # CLIP caps its logit scale at 100


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


def encode_texts(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(encoder.encode(texts), dtype=np.float32))


class ContrastiveAligner(nn.Module):
    """Vision tail + image/report projections into one normalised embedding space, and the temperature."""

    def __init__(self, vision: VisionEncoder, text_dim: int, pc: PretrainConfig, concat_views: bool = False):
        super().__init__()
        self.vision, self.concat_views = vision, concat_views
        self.vision.trunk.requires_grad_(False)
        self.image_proj = nn.Linear(vision.width, pc.embed_dim)
        self.text_proj = nn.Linear(text_dim, pc.embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(pc.temperature)), requires_grad=pc.learn_temperature)

    def image_embeddings(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """(B, [V,] *trunk) -> (B, embed_dim); with concat_views a study pools the tokens of all its views."""
        return F.normalize(self.image_proj(view_tokens(self.vision, trunk_features, self.concat_views).mean(1)), dim=-1)

    def text_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_features), dim=-1)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("vision.")}


def text_groups(texts: list[str]) -> torch.Tensor:
    """One id per distinct report text: rows with the same id are each other's positives."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts])


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised (B, D) embeddings; the target spreads over all same-text rows."""
    logits = image @ text.T / temperature
    positive = (groups[:, None] == groups[None, :]).to(logits.dtype)  # symmetric
    target = positive / positive.sum(1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor, ks=RECALL_AT) -> dict:
    """Recall@k both ways, and what random ranking would score (a query with m positives among N: 1 - C(N-m,k)/C(N,k))."""
    sim = image @ text.T
    positive = groups[:, None] == groups[None, :]
    n = len(groups)
    out: dict = {}
    for direction, scores in (("image_to_report", sim), ("report_to_image", sim.T)):
        hits = positive.gather(1, scores.argsort(dim=1, descending=True, stable=True))
        for k in ks:
            out[f"{direction}_R@{k}"] = round(float(hits[:, :k].any(1).double().mean()), 6)
    m = positive.sum(1).tolist()
    for k in ks:
        chance = np.mean([1 - math.comb(n - mi, k) / math.comb(n, k) if k <= n else 1.0 for mi in m])
        out[f"chance_R@{k}"] = round(float(chance), 6)
    return out


def label_prompts(label_names: list[str], template: str) -> list[str]:
    return [template.format(label=name.replace("_", " ")) for name in label_names]


@torch.no_grad()
def zero_shot_label_similarity(aligner: ContrastiveAligner, text_encoder: TextEncoder, trunk_features: torch.Tensor,
                               label_names: list[str], template: str = "findings of {label}") -> np.ndarray:
    """(N, K) cosine similarity of each image's embedding with the embedding of each label's prompt."""
    aligner.eval()
    prompts = aligner.text_embeddings(encode_texts(text_encoder, label_prompts(label_names, template)))
    image = torch.cat([aligner.image_embeddings(trunk_features[s : s + 64]) for s in range(0, len(trunk_features), 64)])
    return (image @ prompts.T).numpy()


@torch.no_grad()
def zero_shot_prompt_embeddings(aligner: ContrastiveAligner, text_encoder: TextEncoder, label_names: list[str],
                                pc: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) prompt embeddings (K, embed_dim), normalised: CLIP-style binary zero-shot
    classification, p_k = softmax_T(cos(image, positive_k), cos(image, negative_k))[0]."""
    aligner.eval()
    positive = aligner.text_embeddings(encode_texts(text_encoder, label_prompts(label_names, pc.label_prompt)))
    negative = aligner.text_embeddings(encode_texts(text_encoder, label_prompts(label_names, pc.negative_prompt)))
    return positive, negative


@torch.no_grad()
def zero_shot_logits(aligner: ContrastiveAligner, prompts: tuple[torch.Tensor, torch.Tensor],
                     trunk_features: torch.Tensor) -> torch.Tensor:
    """(N, K) logits of the binary zero-shot classification: (cos(image, pos) - cos(image, neg)) / T."""
    aligner.eval()
    positive, negative = prompts
    image = torch.cat([aligner.image_embeddings(trunk_features[s : s + 64]) for s in range(0, len(trunk_features), 64)])
    return image @ (positive - negative).T / aligner.temperature()

