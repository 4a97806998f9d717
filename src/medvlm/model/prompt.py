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


def prior_knowledge_text(probs: Sequence[float], label_names: Sequence[str], threshold: float) -> str:
    """ClinicalBLIP-style prior: findings above `threshold`, most probable first, with their probabilities."""
    found = sorted(((-float(p), k) for k, p in enumerate(probs) if float(p) > threshold))
    if not found:
        return "No suspected findings."
    listed = ", ".join(f"{label_names[k].replace('_', ' ')} {-neg:.2f}" for neg, k in found)
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

    def post_ids(self, prompt_index: int, probs: Sequence[float] | None = None, indication: str | None = None
                 ) -> list[int]:
        """Ids after the soft tokens; with the prior prompt on, `probs` (one per label) add the predicted findings;
        with model.indication on, the study's `indication` (if it has one) comes first: "Indication: ...".
        With both off (or no indication and the prior off) the ids are the fixed ones of the prompt."""
        told = indication_text(indication) if self.indication else ""
        if not self.prior and not told:
            return self.posts[prompt_index]
        if self.prior and probs is None:
            raise ConfigError("model.prior_prompt is on but no predicted probabilities reached the prompt")
        prior = prior_knowledge_text(probs, self.label_names, self.threshold) if self.prior else ""
        extra = " ".join(t for t in (told, prior) if t)
        if not self.template:
            return self.tokenizer(extra, add_special_tokens=False)["input_ids"] + [self.bos]
        # the whole post text is tokenised at once, so the added text's first word merges with what precedes it as
        # the tokenizer would merge it in running text
        head, tail = self._post_texts[prompt_index]
        return self.tokenizer(f"{head} {extra}{tail}", add_special_tokens=False)["input_ids"]

    def encode_report(self, report: str) -> list[int]:
        ids = self.tokenizer(report, add_special_tokens=False)["input_ids"][: self.max_report_tokens - 1]
        return ids + [self.eos]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
