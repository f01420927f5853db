"""Language models assembled from kuramoto_attn: a GPT-2-style PhaseGPT and a TPI language model.

``MODELS`` maps a config's ``model.type`` to ``(model class, config class)``::

    model_cls, config_cls = MODELS["gpt"]
    model = model_cls(config_cls.from_dict(section))
"""

from .config import ConfigError, check, check_types, from_dict, to_dict
from .gpt import GPT, GPTCache, GPTConfig, GPTInfo, KVCache
from .tpi_lm import TPICache, TPILM, TPILMConfig, TPILMInfo

__all__ = ["GPT", "GPTCache", "GPTConfig", "GPTInfo", "KVCache", "MODELS", "TPICache", "TPILM", "TPILMConfig",
           "TPILMInfo", "ConfigError", "check", "check_types", "from_dict", "to_dict"]

#: ``model.type`` -> ``(model class, config class)``
MODELS = {"gpt": (GPT, GPTConfig), "tpi": (TPILM, TPILMConfig)}
