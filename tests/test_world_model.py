"""The embedded world's base model: names as in SD, exact save/load, deterministic sampling, real learning.

Why these checks: every later step of the world (LoRA zoo, ingest, analyses) relies on the UNet's
module names matching Stable Diffusion's, on the shipped weights being exactly the trained ones, on
samples being a function of (prompt, seed) only, and on the training loop actually learning and
resuming where it stopped. The configs are tiny (16×16 images, ≈ 0.1 M parameters) so all of it runs
in seconds on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from wsa.errors import ConfigError, StoreError
from wsa.worlds import get_family
from wsa.worlds.model import CONFIG_FILE, WEIGHTS_FILE, BaseModel, ModelConfig
from wsa.worlds.train_base import CHECKPOINT, ChunkStream, TrainConfig, diffusion_loss, train_base

TINY = ModelConfig(
    image_size=16,
    block_out_channels=(16, 32, 32),
    cross_attention_dim=16,
    attention_heads=2,
    norm_num_groups=8,
    text_heads=2,
)
PROMPTS = ["a face, smiling, on blue", "a face, frowning, on red", "a sks face, neutral, on green"]
TRAIN = {"batch_size": 4, "chunk_batches": 2, "chunk_reuse": 1, "log_every": 1, "progress": False, "grid_images": 0}


@pytest.fixture(scope="module")
def faces():
    return get_family("faces")


@pytest.fixture
def model(faces):
    return BaseModel(TINY, faces.vocabulary(), "faces", seed=0).eval()


def test_module_names_are_stable_diffusion_names(model):
    names = {n for n, _ in model.unet.named_modules()}
    for path in (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    ):
        assert path in names
    # The fast layout: no attention at full resolution.
    assert not any(n.startswith("down_blocks.0.attentions") for n in names)


def test_default_config_fits_the_shipping_budget(faces):
    model = BaseModel(ModelConfig(), faces.vocabulary(), "faces")
    n = sum(p.numel() for p in model.parameters())
    assert 1_500_000 < n < 3_500_000  # fp16: about 2 bytes each, well under 10 MB


def test_tokenizer_pads_and_rejects_unknown_words(model):
    ids = model.tokenizer(["a face, smiling, on blue", ""])
    assert ids.shape == (2, TINY.max_tokens)
    assert ids[0, :5].ne(0).all()
    assert ids[0, 5:].eq(0).all()
    assert ids[1].eq(0).all()
    with pytest.raises(ConfigError, match="'cat'"):
        model.tokenizer(["a cat, smiling, on blue"])
    with pytest.raises(ConfigError, match="at most"):
        model.tokenizer([" ".join(["a"] * (TINY.max_tokens + 1))])


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    model.info = {"steps_done": 0}
    model.save(tmp_path, dtype=torch.float32)
    loaded = BaseModel.load(tmp_path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    ids = model.tokenizer(PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(x, t, ids), loaded(x, t, ids))
    assert loaded.info == {"steps_done": 0}
    assert loaded.family == "faces"
    assert loaded.tokenizer.vocabulary == model.tokenizer.vocabulary


def test_fp16_shipping_weights_are_close_and_checksummed(model, tmp_path):
    model.save(tmp_path)  # default: fp16
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record["weights"]["dtype"] == "float16"
    assert len(record["weights"]["sha256"]) == 64
    loaded = BaseModel.load(tmp_path)
    assert loaded.unet.dtype == torch.float32  # highest precision on load
    for (name, a), b in zip(model.weights().items(), loaded.weights().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), name


def test_checksum_mismatch_raises(model, tmp_path):
    model.save(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        BaseModel.load(tmp_path)


def test_load_refuses_a_folder_without_model_files(tmp_path):
    with pytest.raises(StoreError, match="not a base model folder"):
        BaseModel.load(tmp_path)


def test_sampling_is_deterministic_per_seed_and_batch_invariant(model):
    batch = model.sample(PROMPTS, [3, 4, 5], steps=4, guidance=3.0)
    assert batch.shape == (3, 3, 16, 16)
    assert batch.min() >= 0
    assert batch.max() <= 1
    alone = torch.cat([model.sample([p], [s], steps=4, guidance=3.0) for p, s in zip(PROMPTS, [3, 4, 5], strict=True)])
    assert torch.allclose(batch, alone, atol=1e-4)  # float rounding of batched kernels only
    again = model.sample(PROMPTS, [3, 4, 5], steps=4, guidance=3.0)
    assert torch.equal(batch, again)
    other = model.sample(PROMPTS, [6, 4, 5], steps=4, guidance=3.0)  # negative control: the seed matters
    assert not torch.allclose(batch[0], other[0], atol=1e-3)
    assert torch.allclose(batch[1:], other[1:], atol=1e-4)


def test_stock_pipeline_gives_the_same_images(model):
    seeds = [0, 1]
    ours = model.sample(PROMPTS[:2], seeds, steps=4, guidance=2.0)
    with torch.no_grad():
        images = model.pipeline()(
            prompt_embeds=model.encode_prompts(PROMPTS[:2]),
            negative_prompt_embeds=model.encode_prompts(["", ""]),
            height=16,
            width=16,
            num_inference_steps=4,
            guidance_scale=2.0,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="latent",
        ).images
    assert torch.allclose(((images + 1) / 2).clamp(0, 1), ours, atol=1e-4)


def test_peft_rank1_lora_attaches_and_loads_with_wsa(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from wsa import load_adapter

    peft_model = get_peft_model(model.unet, LoraConfig(r=1, lora_alpha=1, target_modules=["to_q", "to_v"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(tmp_path / "lora")
    adapter = load_adapter(tmp_path / "lora")
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert q in adapter.modules
    # 3 transformer blocks × (attn1, attn2) × (to_q, to_v) in this layout with layers_per_block=1: 2 down, 1 mid, 4 up.
    assert len(adapter.modules) == 7 * 2 * 2
    assert all(m.rsplit(".", 1)[-1] in ("to_q", "to_v") for m in adapter.modules)


def test_training_steps_reduce_the_loss_on_a_fixed_batch(faces, model):
    stream = ChunkStream(faces, TrainConfig(**TRAIN), model)
    try:
        images, ids = stream.batch(0, torch.device("cpu"))
    finally:
        stream.close()
    assert images.shape == (4, 3, 16, 16)
    assert images.min() >= -1
    assert images.max() <= 1
    from wsa.decoding.schedule import alphas_cumprod

    alphas = alphas_cumprod(TINY)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return diffusion_loss(model, images, ids, alphas, torch.Generator().manual_seed(0))

    with torch.no_grad():
        first = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        last = loss().item()
    assert last < 0.7 * first


def test_chunks_are_a_function_of_seed_and_index(faces, model):
    cfg = TrainConfig(**TRAIN)
    a, b = ChunkStream(faces, cfg, model), ChunkStream(faces, cfg, model, start_step=2)
    try:
        assert torch.equal(a.batch(2, torch.device("cpu"))[0], b.batch(2, torch.device("cpu"))[0])
        assert not torch.equal(a.batch(3, torch.device("cpu"))[0], a.batch(4, torch.device("cpu"))[0])
    finally:
        a.close()
        b.close()


def test_training_resumes_from_checkpoint_and_matches_an_uninterrupted_run(faces, tmp_path):
    options = {**TRAIN, "steps": 2, "checkpoint_every": 100, "warmup_steps": 1, "n_identities": 20}
    whole = train_base(faces, tmp_path / "whole", model_config=TINY, **options)
    # max_minutes tiny: stops after the first step, with a checkpoint, and still writes the folder.
    part = train_base(faces, tmp_path / "part", model_config=TINY, **{**options, "max_minutes": 1e-9})
    assert part.info["stopped_early"]
    assert part.info["steps_done"] == 1
    state = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert state["step"] == 1
    resumed = train_base(faces, tmp_path / "part", model_config=TINY, **options)
    assert resumed.info["steps_done"] == 2
    assert not resumed.info["stopped_early"]
    assert [s for s, _ in resumed.info["losses"]] == [1, 2]
    for (name, a), b in zip(whole.weights().items(), resumed.weights().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    loaded = BaseModel.load(tmp_path / "part")
    assert loaded.info["steps_done"] == 2
    with pytest.raises(ConfigError, match="other training options"):
        train_base(faces, tmp_path / "part", model_config=TINY, **{**options, "lr": 0.5})


def test_unknown_training_option_is_an_error(faces, tmp_path):
    with pytest.raises(ConfigError, match="unknown training option"):
        train_base(faces, tmp_path, model_config=TINY, step=3)


@pytest.mark.slow
def test_sample_grid_is_written(faces, tmp_path):
    train_base(faces, tmp_path, model_config=TINY, **{**TRAIN, "steps": 1, "grid_images": 4})
    assert (tmp_path / "samples.png").stat().st_size > 0
