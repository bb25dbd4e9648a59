"""Chroma (Chroma1-HD, -Base, -Flash): FLUX.1-schnell pruned of its per-block modulation layers.

Native names are FLUX.1's (what sd-scripts ``--model_type chroma``, ai-toolkit and ComfyUI write),
without ``img_mod``/``txt_mod``/``modulation`` and the ``time_in``/``vector_in``/``guidance_in``
embedders, plus the ``distilled_guidance_layer`` that computes all modulations. The map to diffusers'
``ChromaTransformer2DModel`` is diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``
(approximator ``layers.{j}.in_layer``/``out_layer`` -> ``linear_1``/``linear_2``) and, for the shared
blocks, FLUX.1's (``_convert_kohya_flux_lora_to_diffusers``): ``qkv`` splits into three, ``linear1``
into q, k, v and ``proj_mlp``. ChromaPipeline loads LoRAs with ``FluxLoraLoaderMixin``.

Chroma's attention and MLP names coincide with FLUX.1's: a file that has only those fits both and is
FLUX.1 unless its metadata says ``chroma`` (sd-scripts, ai-toolkit) or it has ``distilled_guidance_layer``
modules (the only Chroma-only modules; a missing ``norm1.linear`` proves nothing).
"""

from __future__ import annotations

from wsa.families.base import Family, native
from wsa.families.flux1 import DOUBLE as FLUX1_DOUBLE
from wsa.families.flux1 import SINGLE as FLUX1_SINGLE
from wsa.families.flux1 import TOP as FLUX1_TOP
from wsa.families.flux1 import fits_block_range
from wsa.families.registry import register

_G = "distilled_guidance_layer"

#: FLUX.1's rules less the modulation layers Chroma pruned (per block and the timestep/vector embedders).
_PRUNED = ("img_mod.lin", "txt_mod.lin", "modulation.lin", "time_in.", "vector_in.", "guidance_in.", "adaLN_modulation")
DOUBLE = tuple(r for r in FLUX1_DOUBLE if not any(p in r.native for p in _PRUNED))
SINGLE = tuple(r for r in FLUX1_SINGLE if not any(p in r.native for p in _PRUNED))
TOP = tuple(r for r in FLUX1_TOP if not any(p in r.native for p in _PRUNED))
#: The approximator (``ChromaApproximator``): same names in both except its MLP layers.
GUIDANCE = (
    native(f"{_G}.in_proj", f"{_G}.in_proj"),
    native(f"{_G}.layers.{{j}}.in_layer", f"{_G}.layers.{{j}}.linear_1"),
    native(f"{_G}.layers.{{j}}.out_layer", f"{_G}.layers.{{j}}.linear_2"),
    native(f"{_G}.norms.{{j}}", f"{_G}.norms.{{j}}"),
    native(f"{_G}.out_proj", f"{_G}.out_proj"),
)

CHROMA = register(
    Family(
        name="chroma",
        title="Chroma",
        denoiser="transformer",
        natives=(*DOUBLE, *SINGLE, *TOP, *GUIDANCE),
        # sd-scripts' modelspec ARCH_FLUX_1_CHROMA and ss_base_model_version, ai-toolkit's arch: "chroma".
        metadata_names=("chroma",),
        # T5-XXL is ChromaPipeline's only text encoder: sd-scripts' lora_te3_, ComfyUI's t5xxl.
        text_encoders={"lora_te_": "text_encoder", "lora_te3_": "text_encoder"},
        hidden_sizes=(3072,),
        fits=fits_block_range,
        evidence=rf"^{_G}\.",
    )
)
