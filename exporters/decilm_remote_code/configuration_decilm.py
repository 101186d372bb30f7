"""``DeciLMConfig``: a Llama config with one ``BlockConfig`` per layer (``model_type`` nemotron-nas).

Written by ffnfusion for ``trust_remote_code`` loaders (vLLM, TensorRT-LLM), which read
``config.block_configs[i].attention.no_op`` and friends as attributes.
"""

from transformers import LlamaConfig

from .block_config import BlockConfig


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [entry if isinstance(entry, BlockConfig) else BlockConfig(**entry)
                              for entry in (block_configs or [])]
        for per_layer in ("intermediate_size", "num_key_value_heads"):
            kwargs.pop(per_layer, None)
        super().__init__(**kwargs)
        # Per-layer in block_configs; the global values would mislead. (object.__setattr__: the
        # strict dataclass configs of transformers 5 type these as int.)
        object.__setattr__(self, "intermediate_size", None)
        object.__setattr__(self, "num_key_value_heads", None)
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"{len(self.block_configs)} block_configs for num_hidden_layers={self.num_hidden_layers}")

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        return output
