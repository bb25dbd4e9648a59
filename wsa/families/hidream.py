"""HiDream-I1 (Full, Dev, Fast) and HiDream-E1, and the fine-tunes that keep their keys.

HiDream's own checkpoint names its modules as diffusers' ``HiDreamImageTransformer2DModel`` does
(``double_stream_blocks.0.block.attn1.to_q``), so what ai-toolkit and ComfyUI write
(``diffusion_model.<path>``) and what SimpleTuner writes (``transformer.<path>``) agree after the prefix:
diffusers' ``_convert_non_diffusers_hidream_lora_to_diffusers`` only swaps ``diffusion_model.`` for
``transformer.``. Nothing is fused. The image stream's feed-forward is a mixture of experts
(``ff_i.shared_experts`` and ``ff_i.experts.{j}``, ``{j}`` the expert); its router ``ff_i.gate`` is a bare
parameter (not a Linear), reachable only as a full ``.diff``. The text-stream modules of the double-stream
blocks end in ``_t`` (``to_q_t``, ``ff_t``).
"""

from __future__ import annotations

from wsa.families.base import Family
from wsa.families.registry import register

_ATTN = ("to_q", "to_k", "to_v", "to_out", "q_rms_norm", "k_rms_norm")
_FF = ("w1", "w2", "w3")


def _moe(prefix: str) -> tuple[str, ...]:
    return (
        *(f"{prefix}.ff_i.shared_experts.{w}" for w in _FF),
        *(f"{prefix}.ff_i.experts.{{j}}.{w}" for w in _FF),
        f"{prefix}.ff_i.gate",
    )


_D = "double_stream_blocks.{i}.block"
_S = "single_stream_blocks.{i}.block"

DOUBLE = (
    f"{_D}.adaLN_modulation.1",
    *(f"{_D}.attn1.{a}" for a in _ATTN),
    *(f"{_D}.attn1.{a}_t" for a in _ATTN),
    *_moe(_D),
    *(f"{_D}.ff_t.{w}" for w in _FF),
)
SINGLE = (f"{_S}.adaLN_modulation.1", *(f"{_S}.attn1.{a}" for a in _ATTN), *_moe(_S))
TOP = (
    "x_embedder.proj",
    "t_embedder.timestep_embedder.linear_1",
    "t_embedder.timestep_embedder.linear_2",
    "p_embedder.pooled_embedder.linear_1",
    "p_embedder.pooled_embedder.linear_2",
    "caption_projection.{i}.linear",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)

HIDREAM = register(
    Family(
        name="hidream",
        title="HiDream-I1",
        denoiser="transformer",
        modules=DOUBLE + SINGLE + TOP,
        metadata_names=("hidream",),
        hidden_sizes=(2560,),
    )
)
