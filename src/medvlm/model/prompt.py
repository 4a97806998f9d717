"""Prompt layout: the token ids around the soft tokens (queries, clues), and the prior-knowledge sentence.

Input layout of one sample (prompt template on; the LM's chat template renders the turns):
    [pre: system + user-turn start] [soft tokens] [post: prompt text (+ prior) + assistant-turn start] [report] [eos]
Template off: [soft tokens] [(prior text)] [bos] [report] [eos].
`pre` is the same for every sample; `post` depends on the prompt chosen and, with model.prior_prompt, on the
sample's predicted findings, so it is built per sample (post_ids).
"""

from __future__ import annotations

from collections.abc import Sequence

from medvlm.config import Config
from medvlm.errors import ConfigError

_QUERY_MARK = "\x00QUERIES\x00"
_PRIOR_MARK = "\x00PRIOR\x00"


def indication_text(indication) -> str:
    """ "Indication: fever, cough for 5 days." for a study's indication; "" when it has none."""
    if indication is None or (isinstance(indication, float) and indication != indication):  # None / NaN
        return ""
    text = " ".join(str(indication).split()).rstrip(".")
    return f"Indication: {text}." if text else ""


def prior_knowledge_text(probs: Sequence[float], label_names: Sequence[str], threshold: float | Sequence[float],
                         with_probabilities: bool = True) -> str:
    """ClinicalBLIP-style prior: findings above `threshold` (one for all labels or one per label), most probable
    first with their probabilities, or (with_probabilities off) names only in label order."""
    cuts = [float(threshold)] * len(probs) if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    found = [(-float(p), k) for k, p in enumerate(probs) if float(p) > cuts[k]]
    if not found:
        return "No suspected findings."
    if not with_probabilities:
        return "Suspected: " + ", ".join(label_names[k].replace("_", " ") for _, k in sorted(found, key=lambda f: f[1])) + "."
    listed = ", ".join(f"{label_names[k].replace('_', ' ')} {-neg:.2f}" for neg, k in sorted(found))
    return f"Suspected: {listed}."


class PromptLayout:
    """Token ids around the soft-token slot, one (pre, post) pair per configured prompt; pre is shared by all."""

    def __init__(self, tokenizer, cfg: Config):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos
        self.max_report_tokens = cfg.model.max_report_tokens
        self.prior = cfg.model.prior_prompt
        self.indication = cfg.model.indication
        self.label_names, self.threshold = list(cfg.data.label_names), cfg.model.prior_threshold
        # prior_source labels: names only (training lists the true findings, which carry no probability)
        self.prior_probabilities = cfg.model.prior_source == "predicted"
        self.thresholds: list[float] | None = None  # per-label cuts for predicted findings (set from a trained model)
        self.template = cfg.model.prompt_template
        if not self.template:
            self.pre, self.posts = [], [[self.bos]]
            return
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"model.prompt_template is on but the tokenizer of {cfg.model.lm!r} has no chat template")
        pres, self.posts, self._post_texts = [], [], []
        for prompt in cfg.model.prompts:
            messages = [{"role": "system", "content": cfg.model.system_prompt}] if cfg.model.system_prompt else []
            messages.append({"role": "user", "content": _QUERY_MARK + prompt + _PRIOR_MARK})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split(_QUERY_MARK)
            pres.append(tokenizer(before, add_special_tokens=False)["input_ids"])
            self.posts.append(tokenizer(after.replace(_PRIOR_MARK, ""), add_special_tokens=False)["input_ids"])
            self._post_texts.append(after.split(_PRIOR_MARK))
        self.pre = pres[0]

    def post_ids(self, prompt_index: int, probs: Sequence[float] | None = None, context: str | None = None,
                 indication: str | None = None) -> list[int]:
        """Ids after the soft tokens. With model.indication on, the study's `indication` (if it has one) comes first:
        "Indication: ..."; then `context` (retrieval-augmented generation: the similar cases); then, with the prior
        prompt on, the findings of `probs` (one per label). With none of them the ids are the fixed ones of the prompt."""
        told = indication_text(indication) if self.indication else ""
        parts = [x for x in (told, context) if x]
        if self.prior:
            if probs is None:
                raise ConfigError("model.prior_prompt is on but no predicted probabilities reached the prompt")
            cut = self.thresholds if self.thresholds is not None else self.threshold
            parts.append(prior_knowledge_text(probs, self.label_names, cut, self.prior_probabilities))
        if not parts:
            return self.posts[prompt_index]
        extra = " ".join(parts)
        if not self.template:
            return self.tokenizer(extra, add_special_tokens=False)["input_ids"] + [self.bos]
        # the whole post text is tokenised at once, so the extra text's first word merges with what precedes it
        # as the tokenizer would merge it in running text
        head, tail = self._post_texts[prompt_index]
        return self.tokenizer(f"{head} {extra}{tail}", add_special_tokens=False)["input_ids"]

    def encode_report(self, report: str) -> list[int]:
        ids = self.tokenizer(report, add_special_tokens=False)["input_ids"][: self.max_report_tokens - 1]
        return ids + [self.eos]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
