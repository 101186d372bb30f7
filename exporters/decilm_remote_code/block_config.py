"""Per-layer configuration of a Nemotron-NAS (DeciLM) model, for ``trust_remote_code``.

Written by ffnfusion from the engines' semantics (vLLM, TensorRT-LLM and llama.cpp read these fields):
``attention.no_op`` drops the layer's attention, ``n_heads_in_group`` sets its KV heads
(``num_attention_heads // n_heads_in_group``); ``ffn.no_op`` drops its FFN, ``ffn_mult`` sets its width
``round_up_256(int(2 * ffn_mult * hidden_size / 3))``.
"""

import dataclasses
import warnings


@dataclasses.dataclass
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    n_heads_in_group: int | None = None
    window_length: int | None = None
    num_sink_tokens: int | None = None
    use_prefill_window_in_sink_attention: bool = False
    unshifted_sink: bool = False

    def __post_init__(self):
        if self.no_op or self.replace_with_linear:
            self.n_heads_in_group = None
            self.window_length = None
            self.num_sink_tokens = None


@dataclasses.dataclass
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    ffn_mult: float | None = None

    def __post_init__(self):
        if self.no_op or self.replace_with_linear:
            self.ffn_mult = None
        elif self.ffn_mult is not None:
            self.ffn_mult = round(self.ffn_mult, 6)


def _known(cls, entry: dict) -> dict:
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
    return {key: value for key, value in entry.items() if key in names}


@dataclasses.dataclass
class BlockConfig:
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    ffn: FFNConfig = dataclasses.field(default_factory=FFNConfig)

    def __post_init__(self):
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**_known(AttentionConfig, self.attention))
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**_known(FFNConfig, self.ffn))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
