"""MedVLM's model, one piece per file, assembled in medvlm.py:

encoder.py         VisionEncoder: frozen trunk (cached by the features stage) + tunable tail -> visual tokens
vision.py          build_vision: the 2-D (vision2d.py) or volume (vision3d.py) encoder model.vision names
discrimination.py  DEM: multi-label classifier -> label embeddings fused into the visual tokens (+ BCE loss)
clues.py           disease clues (TRRG): probability-scaled clue embeddings -> cross-attention + LM clue tokens
qformer.py         BLIP-2 Q-Former with learned queries -> soft tokens in the LM's embedding space
lm.py              the causal LM (SmolLM2-135M-Instruct offline, converted once from GGUF) truncated to lm_layers
strategies.py      looks a strategy up (medvlm.strategies: one module each) and lets it mark the model
prompt.py          prompt layout around the soft tokens, prior-knowledge sentence (ClinicalBLIP)
retrieval.py       index of training cases for retrieval-augmented prompts (model.retrieval)
contrastive.py     CLIP-style image-report aligner of the pretrain_vision stage, zero-shot label scores
runtime.py         plain-torch Llama LM + tokenizer for inference (runtime_qformer.py: its Q-Former)
medvlm.py          the assembly and training loss
"""

from medvlm.model.medvlm import MedVLM, PromptLayout
from medvlm.model.strategies import STRATEGIES

__all__ = ["MedVLM", "PromptLayout", "STRATEGIES"]
