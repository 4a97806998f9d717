"""medvlm: lung CT and chest X-ray report generation with a multimodal LLM, run as an MLOps project."""

from medvlm import env as _env

_env.apply_defaults()

__version__ = "0.1.0"
