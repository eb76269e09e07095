"""The shape and hyper-parameters of a Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).

A :class:`ModelConfig` is built from a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf_dict`) or from
GGUF metadata (:func:`server.engine.weights.read_gguf`). RoPE parameters are kept in one normalised dict,
``rope_scaling``, whatever the source calls them (``rope_scaling`` in transformers 4.x, ``rope_parameters``
in 5.x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from attention_backends.cost import ModelShape, hf_text_config

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig(ModelShape):
    """The shape (:class:`~attention_backends.cost.ModelShape`'s fields, first) and everything else the
    engine needs to build and run the model."""

    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None or a dict with "rope_type" ("linear" | "llama3" | "yarn") and its parameters (HF names)
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias=True)
    attention_out_bias: bool = False  # o_proj bias (Llama with attention_bias=True; never Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # Mistral v0.1; the native engine refuses one shorter than its context
    model_type: str = "llama"
    name: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported RoPE scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
            if rope_type == "default":
                self.rope_scaling = None

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_model_shape(self) -> ModelShape:
        """The dimensions cost accounting needs, alone (:class:`attention_backends.cost.ModelShape`)."""
        return ModelShape(**{f.name: getattr(self, f.name) for f in fields(ModelShape)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout; a multimodal wrapper's
        ``text_config``): the shape as :meth:`ModelShape.from_hf_config` reads it, then the rest."""
        cfg = dict(hf_text_config(cfg))
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")
        rope_params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope_params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
        if float(rope_params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        rope_type = rope_params.pop("rope_type", None) or rope_params.pop("type", None) or "default"
        rope_params.pop("type", None)
        rope_scaling: dict[str, Any] | None = None
        if rope_type != "default":
            rope_scaling = {"rope_type": rope_type, **rope_params}
            if rope_type in ("llama3", "yarn"):
                orig = cfg.get("original_max_position_embeddings")
                if orig is not None:
                    rope_scaling["original_max_position_embeddings"] = orig
                rope_scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
        sliding_window = None
        if model_type == "mistral" or cfg.get("use_sliding_window"):
            sliding_window = cfg.get("sliding_window")
        return cls(
            **asdict(ModelShape.from_hf_config(cfg)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2 always has q/k/v biases; Llama/Mistral have them only with attention_bias=True
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            attention_out_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding_window,
            model_type=model_type,
            name=name,
        )
