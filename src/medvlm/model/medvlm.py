"""MedVLM assembled: vision tail -> discrimination module -> (disease clues) -> Q-Former -> causal LM (+ strategy).

Input layout of one sample (prompt template on; the LM's chat template renders the turns; see prompt.py):
    [pre: system + user-turn start] [Q query embeddings] [K clue tokens, model.clues] [post: prompt text
    (+ predicted findings, model.prior_prompt) + assistant-turn start] [report] [eos]
Template off: [Q queries] [K clues] [(prior text)] [bos] [report] [eos]. The loss covers only the report and its
end token, and the LM head (49k-vocab, a large share of the CPU cost) is applied only at those positions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import Config
from medvlm.errors import ModelError
from medvlm.model.clues import DiseaseClues
from medvlm.model.discrimination import DiscriminationModule, discrimination_loss
from medvlm.model.encoder import VisionEncoder, view_tokens
from medvlm.model.lm import load_lm, load_runtime_lm
from medvlm.model.prompt import PromptLayout
from medvlm.model.qformer import QFormerBridge
from medvlm.model.retrieval import embed
from medvlm.model.strategies import apply_strategy, check_strategy
from medvlm.model.vision import build_vision


class MedVLM(nn.Module):
    def __init__(self, cfg: Config, strategy: str, vision: VisionEncoder | None = None, lm=None, tokenizer=None,
                 runtime: bool = False):
        """runtime=True (inference): the LM, Q-Former, adapters and tokenizer are model/runtime.py's plain-torch
        twins when the LM allows it (a local Llama-family folder), so nothing imports transformers; same weights."""
        super().__init__()
        check_strategy(cfg, strategy)
        self.cfg, self.strategy = cfg, strategy
        self.vision = vision if vision is not None else build_vision(cfg)
        self.runtime = False
        if lm is None and runtime:
            loaded = load_runtime_lm(cfg.model)
            if loaded is not None:
                (lm, tokenizer), self.runtime = loaded, True
        if lm is None:
            lm, tokenizer = load_lm(cfg.model)
        self.lm, self.tokenizer = lm, tokenizer
        self.layout = PromptLayout(tokenizer, cfg)
        self.n_labels = len(cfg.data.label_names)
        width = self.vision.width
        self.dem = (DiscriminationModule(width, self.n_labels, cfg.model.label_embed_dim)
                    if cfg.model.discrimination else None)
        lm_width = lm.get_input_embeddings().embedding_dim
        zero_shot = cfg.model.clue_source == "zero_shot"
        self.clues = (DiseaseClues(cfg.model, width, self.n_labels, lm_width,
                                   own_classifier=self.dem is None and not zero_shot,
                                   zero_shot=(self.vision.tail, cfg.pretrain.embed_dim) if zero_shot else None)
                      if cfg.model.clues else None)
        # whether the label logits are trained (DEM or the clue module's classifier) rather than zero-shot
        self.supervised_logits = self.dem is not None or (self.clues is not None and self.clues.classifier is not None)
        self.bridge = QFormerBridge(cfg.model, width, lm_width, runtime=self.runtime)
        # retrieval-augmented generation: a frozen copy of the *pretrained* tail embeds images for the index, which
        # training (train.py) or Predictor.load fills from the training split
        self.retrieval_tail = copy.deepcopy(self.vision.tail).requires_grad_(False) if cfg.model.retrieval.enabled else None
        self.retrieval_index = None
        self.disc_pos_weight: torch.Tensor | None = None
        self.token_loss_weight: torch.Tensor | None = None  # (vocab,) report-token weights (model.finding_token_weight)  # per-label BCE weight (set by training, model.disc_pos_weight_max)
        self.prefix = None
        self.output_vocab: list[int] | None = None
        self.vocab_ids = self.vocab_lookup = None
        apply_strategy(self, cfg, strategy, runtime=self.runtime)
        self.vision.trunk.requires_grad_(False)
        self.vision.tail.requires_grad_(cfg.model.tune_vision_blocks > 0)
        # What this strategy trains and saves. A training stage may switch part of it off for a while
        # (train.multistage freezes the LM side first); checkpoints and saved weights still hold all of it.
        self.trainable_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)

    # ---- pieces shared by training and generation -------------------------------------------------------------
    def visual_queries(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached trunk features -> (soft LM input tokens (B, Q [+ K clues], D_lm), label logits (B, K) or None).

        features.multi_view concat: the views' tokens are concatenated (view_tokens), so the DEM pools and the
        Q-Former attends over all views at once. The logits are the DEM's; without it, the clue module's."""
        concat = self.cfg.features.multi_view == "concat"
        tokens = view_tokens(self.vision, trunk_features, concat)
        logits = None
        if self.dem is not None:
            tokens, logits = self.dem(tokens)
        clue_tokens = None
        if self.clues is not None:
            clue_logits = (self.clues.zero_shot.logits(trunk_features, concat) if self.clues.zero_shot is not None
                           else logits if logits is not None else self.clues.logits(tokens))
            if logits is None:
                logits = clue_logits
            tokens, clue_tokens = self.clues(tokens, torch.sigmoid(clue_logits))
        queries = self.bridge(tokens)
        if clue_tokens is not None:
            queries = torch.cat([queries, clue_tokens.to(queries.dtype)], dim=1)
        return queries, logits

    def post_ids(self, prompt_index: list[int], logits: torch.Tensor | None, labels: torch.Tensor | None = None,
                 contexts: list[str] | None = None, indications: list[str | None] | None = None) -> list[list[int]]:
        """Per-sample prompt ids after the soft tokens: the prompt, the clinical indication (model.indication), the
        similar cases (`contexts`, model.retrieval) and, with model.prior_prompt, the findings. By default
        (prior_source predicted) the *predicted* ones, in training too, so the input looks as it will at test time.
        prior_source labels: in training the true findings (`labels`), so the LM learns to write what is listed; at
        test time (no labels) the classifier fills the list, cut at its per-label thresholds."""
        contexts = contexts or [None] * len(prompt_index)
        indications = indications if indications is not None else [None] * len(prompt_index)
        if not self.layout.prior:
            return [self.layout.post_ids(p, None, c, i) for p, c, i in zip(prompt_index, contexts, indications)]
        if labels is not None and self.cfg.model.prior_source == "labels":
            rows = labels.float().cpu().tolist()
        else:
            rows = torch.sigmoid(logits.detach().float()).cpu().tolist()
        return [self.layout.post_ids(p, row, c, i) for p, row, c, i in zip(prompt_index, rows, contexts, indications)]

    def retrieval_contexts(self, trunk_features: torch.Tensor) -> tuple[list[str] | None, list[list] | None]:
        """(prompt text, neighbours) per sample from the saved retrieval index (model.retrieval); (None, None) off."""
        if self.retrieval_index is None:
            return None, None
        spec = self.cfg.model.retrieval
        hits = self.retrieval_index.search(embed(self.retrieval_tail, trunk_features.float()).cpu(), spec.k)
        return [self.retrieval_index.context(h, spec.report_words) for h in hits], hits

    def prefix_cache(self, batch_size: int, dtype: torch.dtype):
        """The prefix (P-Tuning v2) as a pre-filled KV cache of this LM's kind, None without one."""
        if self.prefix is None:
            return None
        pairs = self.prefix.pairs(batch_size, dtype)
        if self.runtime:
            from medvlm.model.runtime import KVCache

            return KVCache(pairs)
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=pairs)

    def new_cache(self, batch_size: int, dtype: torch.dtype):
        """The decoder's KV cache for generation: the prefix (P-Tuning v2) pre-filled, else empty."""
        cache = self.prefix_cache(batch_size, dtype)
        if cache is not None:
            return cache
        if self.runtime:
            from medvlm.model.runtime import KVCache

            return KVCache()
        from transformers import DynamicCache

        return DynamicCache()

    def prefix_length(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def run_decoder(self, embeds, attention_mask, position_ids, cache):
        """LM decoder only (no vocabulary head): (B, L, D) hidden states; `cache` is updated in place."""
        out = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def set_label_thresholds(self, thresholds: dict[str, float] | None) -> None:
        """Per-label cuts (chosen on the training split) for the findings the prior-knowledge prompt lists at test
        time with prior_source labels; with prior_source predicted the prompt keeps model.prior_threshold, the cut it
        was trained with."""
        if thresholds and self.cfg.model.prior_source == "labels":
            self.layout.thresholds = [float(thresholds.get(n, 0.5)) for n in self.cfg.data.label_names]

    def set_output_vocab(self, token_ids: list[int] | None) -> None:
        """Restrict the LM head to these token ids (closed vocabulary); None = the LM's full vocabulary."""
        self.output_vocab = sorted(set(token_ids) | {self.layout.eos}) if token_ids is not None else None
        if self.output_vocab is None:
            self.vocab_ids = self.vocab_lookup = None
            return
        device = self.lm.get_input_embeddings().weight.device
        self.vocab_ids = torch.tensor(self.output_vocab, dtype=torch.long, device=device)
        lookup = torch.full((self.lm.get_input_embeddings().num_embeddings,), -100, dtype=torch.long, device=device)
        lookup[self.vocab_ids] = torch.arange(len(self.output_vocab), device=device)
        self.vocab_lookup = lookup

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the output vocabulary (index i = token self.output_token(i))."""
        head = self.lm.get_output_embeddings()
        if self.vocab_ids is None:
            return head(hidden)
        ids = self.vocab_ids.to(head.weight.device)
        weight = head.weight[ids]
        bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
        return F.linear(hidden, weight, bias)

    def output_token(self, index: torch.Tensor) -> torch.Tensor:
        return index if self.vocab_ids is None else self.vocab_ids.to(index.device)[index]

    def output_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids if self.vocab_lookup is None else self.vocab_lookup.to(token_ids.device)[token_ids]

    # ---- training forward --------------------------------------------------------------------------------------
    def forward(self, trunk_features: torch.Tensor, reports: list[list[int]], labels: torch.Tensor | None = None,
                prompt_index: list[int] | None = None, contexts: list[str] | None = None,
                indications: list[str | None] | None = None) -> dict[str, torch.Tensor]:
        """Loss of a batch. `reports` are token ids from layout.encode_report; `labels` (B, K) 0/1; `contexts`
        the similar-case text per sample (model.retrieval; training passes leave-group-out neighbours);
        `indications` the studies' clinical indications (used with model.indication)."""
        queries, logits = self.visual_queries(trunk_features)
        batch, n_query, _ = queries.shape
        device = queries.device
        pre = self.layout.pre
        prompt_index = prompt_index or [0] * batch
        # Per-sample token ids after the soft tokens: prompt tail, then the report (right padded).
        posts = self.post_ids(prompt_index, logits, labels if self.training else None, contexts, indications)
        tails = [post + r for post, r in zip(posts, reports)]
        length = len(pre) + n_query + max(len(t) for t in tails)
        ids = torch.full((batch, length), self.layout.pad, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        targets = torch.full((batch, length), -100, dtype=torch.long)
        start = len(pre) + n_query
        for i, (post, report) in enumerate(zip(posts, reports)):
            ids[i, : len(pre)] = torch.tensor(pre, dtype=torch.long) if pre else ids[i, :0]
            ids[i, start : start + len(tails[i])] = torch.tensor(tails[i])
            mask[i, : start + len(tails[i])] = 1
            report_start = start + len(post)
            targets[i, report_start : report_start + len(report)] = torch.tensor(report)
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        embeds = self.embed_ids(ids)
        embeds = torch.cat([embeds[:, : len(pre)], queries.to(embeds.dtype), embeds[:, start:]], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self.prefix_cache(batch, embeds.dtype)
        full_mask = mask
        if cache is not None:
            full_mask = torch.cat([mask.new_ones(batch, self.prefix_length()), mask], dim=1)
        hidden = self.run_decoder(embeds, full_mask, position_ids, cache)
        # Next-token prediction: hidden state t predicts token t+1; the head runs only where a target exists.
        shifted = targets[:, 1:]
        where = shifted != -100
        token_logits = self.lm_head(hidden[:, :-1][where])
        if self.token_loss_weight is None:
            lm_loss = F.cross_entropy(token_logits.float(), self.output_index(shifted[where]))
        else:
            per_token = F.cross_entropy(token_logits.float(), self.output_index(shifted[where]), reduction="none")
            w = self.token_loss_weight.to(device)[shifted[where]]
            lm_loss = (per_token * w).sum() / w.sum()
        out = {"lm_loss": lm_loss, "tokens": where.sum()}
        loss = lm_loss
        if logits is not None:
            out["disc_logits"] = logits
            if labels is not None and self.supervised_logits:
                disc = discrimination_loss(logits, labels.to(device), self.disc_pos_weight)
                out["disc_loss"] = disc
                loss = loss + self.cfg.model.disc_loss_weight * disc
        out["loss"] = loss
        return out

    # ---- trainable weights -------------------------------------------------------------------------------------
    def _frozen_saved(self) -> dict[str, torch.Tensor]:
        """Frozen weights that do not come from the packages and so travel with the trained ones: the zero-shot
        clue source (pre-trained tail, projection, prompt embeddings, temperature; filled from the pretrain stage)."""
        if self.clues is None or self.clues.zero_shot is None:
            return {}
        return {f"clues.zero_shot.{k}": v for k, v in self.clues.zero_shot.state_dict().items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a trained model adds to the pretrained parts: the strategy's trainable weights (+ _frozen_saved)."""
        state = {n: p.detach().contiguous() for n, p in self.named_parameters() if n in self.trainable_names}
        return {**state, **{k: v.detach().contiguous() for k, v in self._frozen_saved().items()}}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        targets = {**{n: p for n, p in self.named_parameters() if n in self.trainable_names}, **self._frozen_saved()}
        missing, unexpected = set(targets) - set(state), set(state) - set(targets)
        if missing or unexpected:
            raise ModelError(f"trainable weights do not fit the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}): was it trained with another config/strategy?")
        with torch.no_grad():
            for name, value in state.items():
                targets[name].copy_(value.to(targets[name].dtype))
