"""The vision encoder named by model.vision: a 2-D backbone (vision2d.py) or a volume encoder (vision3d.py).

Every encoder is a medvlm.model.encoder.VisionEncoder: a frozen trunk (cached by the features stage) and a tunable
tail that turns trunk features into visual tokens.
"""

from __future__ import annotations

from medvlm.config import Config
from medvlm.model.encoder import VisionEncoder
from medvlm.model.vision2d import EFFICIENTNET, efficientnet_encoder, hf_vision_encoder
from medvlm.model.vision3d import VOLUME_ENCODERS, build_volume_encoder


def build_vision(cfg: Config) -> VisionEncoder:
    name, k, size = cfg.model.vision, cfg.model.tune_vision_blocks, cfg.features.image_size
    if name in VOLUME_ENCODERS:
        return build_volume_encoder(cfg)
    if name == EFFICIENTNET:
        return efficientnet_encoder(k, size)
    return hf_vision_encoder(name, k, size)
