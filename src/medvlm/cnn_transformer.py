"""From-scratch R2Gen-like baseline: a small conv net over low-resolution images + a transformer decoder over words.

No pretrained weights anywhere: it shows what the training data alone teaches an encoder-decoder, the reference
point against which the pretrained vision encoder and LM of MedVLM have to justify themselves. Words come from the
cleaned training reports (evaluate.preprocessing), rare ones (< min_word_count) map to <unk>; decoding is greedy.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from medvlm.config import Config
from medvlm.data.images import load_images_for_study
from medvlm.engine import Loop, StepOut
from medvlm.metrics import preprocess
from medvlm.progress import Advance, StageProgress, unwatched

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


class CnnTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        chans = [1, 32, 64, d_model]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.cnn = nn.Sequential(*blocks)  # image/8 x image/8 grid of visual tokens
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(max_tokens + 2, d_model))
        layer = nn.TransformerDecoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Linear(d_model, vocab_size)

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        return self.cnn(images).flatten(2).transpose(1, 2)

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.embed(tokens) + self.pos[:t]
        return self.out(self.decoder(x, memory, tgt_mask=causal))


def _images(cfg: Config, rows: pd.DataFrame, size: int, advance: Advance = unwatched) -> torch.Tensor:
    root = Path(cfg.data.root)
    arrays = []
    for rel in rows["images"]:
        img = load_images_for_study(root, list(rel))[0].resize((size, size))  # first view
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        advance(1)
    x = torch.from_numpy(np.stack(arrays))[:, None]
    return (x - 0.5) / 0.25


def train_and_generate(cfg: Config, train: pd.DataFrame, test: pd.DataFrame) -> tuple[list[str], dict]:
    ct = cfg.evaluate.cnn_transformer
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    convention = "zh_jieba" if cfg.data.report_language == "zh" else cfg.evaluate.preprocessing
    words = [t.split()[: ct.max_tokens] for t in preprocess([str(r) for r in train["report"]], convention)]
    counts = Counter(w for ws in words for w in ws)
    vocab = [PAD, BOS, EOS, UNK] + sorted(w for w, c in counts.items() if c >= ct.min_word_count)
    index = {w: i for i, w in enumerate(vocab)}
    seqs = torch.zeros(len(words), ct.max_tokens + 2, dtype=torch.long)
    for i, ws in enumerate(words):
        ids = [index[BOS]] + [index.get(w, index[UNK]) for w in ws] + [index[EOS]]
        seqs[i, : len(ids)] = torch.tensor(ids)
    with StageProgress("cnn_transformer: images", len(train) + len(test)) as bar:
        x_train = _images(cfg, train, ct.image_size, bar.advance)
        x_test = _images(cfg, test, ct.image_size, bar.advance)
    model = CnnTransformer(len(vocab), ct.d_model, ct.layers, ct.heads, ct.max_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ct.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=index[PAD])
    per_epoch = math.ceil(len(seqs) / ct.batch_size)
    order = torch.arange(len(seqs))

    def step(epoch: int, in_epoch: int) -> StepOut:
        nonlocal order
        if in_epoch == 0 and epoch > 0:  # reshuffle between epochs
            order = order[torch.from_numpy(rng.permutation(len(seqs)))]
        idx = order[in_epoch * ct.batch_size : (in_epoch + 1) * ct.batch_size]
        tokens = seqs[idx]
        length = int((tokens != index[PAD]).sum(1).max())
        logits = model(model.memory(x_train[idx]), tokens[:, : length - 1])
        loss = loss_fn(logits.reshape(-1, len(vocab)), tokens[:, 1:length].reshape(-1))
        loss.backward()
        return StepOut(float(loss.detach()), len(idx))

    model.train()
    with Loop("cnn_transformer: train", ct.epochs * per_epoch, per_epoch=per_epoch) as loop:
        loop.run(step, optimizer)
    last = loop.last.loss if loop.last is not None else float("nan")
    model.eval()
    with StageProgress("cnn_transformer: decode", ct.max_tokens) as bar:
        texts = _greedy(model, x_test, index, vocab, ct.max_tokens, bar.advance)
    return texts, {"vocab_size": len(vocab), "final_loss": round(last, 4), "seconds_training": round(time.perf_counter() - started, 1),
                   "note": "words are the evaluation preprocessing's tokens, so outputs are already cleaned text"}


@torch.no_grad()
def _greedy(model: CnnTransformer, images: torch.Tensor, index: dict, vocab: list[str], max_tokens: int,
            advance: Advance = unwatched) -> list[str]:
    """Greedy decoding of all images at once; `advance` hears of every token position (all the remaining ones at
    once when every report has ended early)."""
    memory = model.memory(images)
    tokens = torch.full((len(images), 1), index[BOS], dtype=torch.long)
    done = torch.zeros(len(images), dtype=torch.bool)
    for step in range(max_tokens):
        nxt = model(memory, tokens)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, index[PAD]), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == index[EOS]
        if bool(done.all()):
            advance(max_tokens - step)
            break
        advance(1)
    texts = []
    for row in tokens[:, 1:].tolist():
        ws = [vocab[i] for i in row if vocab[i] not in (PAD, BOS)]
        ws = ws[: ws.index(EOS)] if EOS in ws else ws
        texts.append(" ".join(ws) or vocab[index[UNK]])
    return texts
