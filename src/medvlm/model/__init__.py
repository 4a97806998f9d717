"""MedVLM's model, one piece per file, assembled in medvlm.py:

vision.py          frozen trunk (cached by the features stage) + tunable tail -> visual tokens
discrimination.py  DEM: multi-label classifier -> label embeddings fused into the visual tokens (+ BCE loss)
clues.py           disease clues (TRRG): probability-scaled clue embeddings -> cross-attention + LM clue tokens
qformer.py         BLIP-2 Q-Former with learned queries -> soft tokens in the LM's embedding space
lm.py              the causal LM (SmolLM2-135M-Instruct offline, converted once from GGUF) truncated to lm_layers
strategies.py      freeze | lora | ptuning_v2: which LM-side parameters train
prompt.py          prompt layout around the soft tokens, prior-knowledge sentence (ClinicalBLIP)
medvlm.py          the assembly and training loss
"""

from medvlm.model.medvlm import MedVLM, PromptLayout
from medvlm.model.strategies import STRATEGIES

__all__ = ["MedVLM", "PromptLayout", "STRATEGIES"]
