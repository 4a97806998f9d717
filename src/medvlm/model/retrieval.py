"""Retrieval-augmented generation (model.retrieval): similar training cases in the prompt.

The index holds the training split only: one L2-normalised embedding per study (the mean-pooled output of the
*pretrained* vision tail on the cached trunk features, the embedding of the retrieval baseline), its study id, its
split group and its report. For an image, the k most similar studies (cosine) are written into the user turn as
"Similar cases: (1, 0.93) <report> (2, 0.91) <report>", each report cut to `report_words` words, and the model
writes the report of this image.

Training sees what a test image would see: the neighbours of a training study exclude the study itself and every
study of its split group (data.group_by: the same image, or the same COV-CTR source paper), because no test image
has a neighbour from its own group. The index is saved with the trained model (retrieval_index.{json,safetensors}),
so generation, serving and the registry use the same cases, and outputs can list them (study id, similarity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medvlm.errors import ModelError

INDEX_JSON, INDEX_TENSORS = "retrieval_index.json", "retrieval_index.safetensors"


@dataclass
class Neighbour:
    index: int
    study_id: str
    similarity: float


class RetrievalIndex:
    def __init__(self, embeddings: torch.Tensor, study_ids: list[str], groups: list[str], reports: list[str]):
        if not (len(embeddings) == len(study_ids) == len(groups) == len(reports)):
            raise ModelError("retrieval index: embeddings, ids, groups and reports differ in length")
        self.embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        self.study_ids, self.groups, self.reports = list(study_ids), list(groups), list(reports)

    def __len__(self) -> int:
        return len(self.study_ids)

    def search(self, queries: torch.Tensor, k: int, exclude_groups: list[str] | None = None) -> list[list[Neighbour]]:
        """The k most similar indexed studies per query embedding (B, D), most similar first; with
        `exclude_groups` (one per query) studies of that group are never returned (leave-group-out)."""
        sims = torch.nn.functional.normalize(queries.float(), dim=-1) @ self.embeddings.T  # (B, N)
        if exclude_groups is not None:
            groups = np.asarray(self.groups)
            for row, group in enumerate(exclude_groups):
                sims[row, torch.from_numpy(groups == group)] = float("-inf")
        k = min(k, len(self))
        top = sims.topk(k, dim=1)
        out = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            out.append([Neighbour(i, self.study_ids[i], round(v, 4)) for v, i in zip(values, indices) if v > float("-inf")])
        return out

    def context(self, neighbours: list[Neighbour], report_words: int) -> str:
        """The prompt text for one image's neighbours."""
        if not neighbours:
            return ""
        cases = []
        for rank, n in enumerate(neighbours, start=1):
            words = self.reports[n.index].split()
            text = " ".join(words[:report_words]) + (" ..." if len(words) > report_words else "")
            cases.append(f"({rank}, {n.similarity:.2f}) {text}")
        return "Similar cases: " + " ".join(cases)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.contiguous()}, folder / INDEX_TENSORS)
        (folder / INDEX_JSON).write_text(json.dumps({"study_ids": self.study_ids, "groups": self.groups,
                                                     "reports": self.reports}, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> "RetrievalIndex":
        json_path, tensor_path = folder / INDEX_JSON, folder / INDEX_TENSORS
        for path in (json_path, tensor_path):
            if not path.is_file():
                raise ModelError(f"{path}: not found (a model trained with model.retrieval keeps its index here)")
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        return cls(load_file(tensor_path)["embeddings"], meta["study_ids"], meta["groups"], meta["reports"])


@torch.no_grad()
def embed(tail: torch.nn.Module, trunk_features: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, *trunk) cached trunk features -> (N, D) mean-pooled tail output (the retrieval embedding)."""
    was_training = tail.training
    tail.eval()
    try:
        return torch.cat([tail(trunk_features[s : s + batch_size]).mean(1).float()
                          for s in range(0, len(trunk_features), batch_size)])
    finally:
        tail.train(was_training)

