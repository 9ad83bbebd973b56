"""Fixtures that need no download: tiny Stable-Diffusion-style (and SD3-style) components and captioned shapes.

Not part of the method: the tests use them, and so do ``latent tiny`` and ``latent shapes-captions``, which let a
user try the latent text-to-image path end to end on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from perceptual_diffusion.config import SampleConfig, ScheduleConfig
from perceptual_diffusion.models.latent import quiet_libraries, sd_pipeline
from perceptual_diffusion.runtime import ownership


def _char_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary: byte-level characters, alone and word-final (no merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # one token per character
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return vocab


def _tiny_tokenizer(tmp: Path, vocab: dict[str, int]) -> Any:
    """A CLIPTokenizer of ``vocab`` built offline (its files in a scratch folder under ``tmp``, removed after)."""
    from transformers import CLIPTokenizer

    words = tmp / ".vocab"
    words.mkdir()
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=32)
    shutil.rmtree(words)
    return tokenizer


def make_tiny_pipeline(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write a randomly initialised, tiny Stable-Diffusion-style folder (0.8 M parameters in all): a character-level
    CLIP tokenizer and 2-layer text encoder, a 2-level ``UNet2DConditionModel`` with cross-attention, and a VAE
    that downsamples 2x. Its images are noise until trained; it exists to run the latent path end to end offline."""
    from diffusers import DDIMScheduler

    from perceptual_diffusion.models.publish import publish_folder
    from perceptual_diffusion.models.schedulers import scheduler_config

    vocab = _char_vocab()

    def write(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer(tmp, vocab)
        text_encoder, unet, vae = _tiny_components(len(vocab), seed)
        scheduler = DDIMScheduler(**scheduler_config(ScheduleConfig(), SampleConfig(clip_x0=False)))
        pipe = sd_pipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
        with quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)

    return publish_folder(Path(out_dir), write, force, kind="tiny-pipeline", command="latent tiny")


# SD3's VAE constants (stabilityai/stable-diffusion-3-medium, vae/config.json): the shift is what SD3 adds.
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609


def _tiny_t5_tokenizer() -> Any:
    """A character-level T5 tokenizer built offline: T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), its
    word-start piece and one Unigram piece per printable ASCII character (anything else is ``<unk>``); like T5's,
    it appends ``</s>`` and pads with ``<pad>``. transformers' ``T5Tokenizer`` (``T5TokenizerFast`` is the same
    class since transformers 5) is backed by the ``tokenizers`` library and saves ``tokenizer.json``."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # U+2581: SentencePiece's word start
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def make_tiny_sd3_pipeline(
    out_dir: str | Path, seed: int = 0, force: bool = False, shift: float = 3.0, t5: bool = False
) -> Path:
    """Write a randomly initialised, tiny SD3-style folder in ``StableDiffusion3Pipeline`` layout: a 4-block
    ``SD3Transformer2DModel`` (patch 2, width 32, SD3.5's qk RMS norm and dual attention in its first block), a 2x
    VAE with SD3's scaling and shift factors, two character-level CLIP text encoders with projections (widths 32 and
    48, so their penultimate states, 80 channels, are zero-padded to the joint width 96 as SD3's 768 + 1280 are to
    4096) and a FlowMatchEulerDiscreteScheduler at ``shift``. Without ``t5`` model_index.json names text_encoder_3
    and tokenizer_3 null; with it they are a 2-layer ``T5EncoderModel`` of width 96 (the joint width, as T5-XXL's
    4096 is SD3's; gated-GELU as T5 v1.1) and a character-level T5 tokenizer (:func:`_tiny_t5_tokenizer`). The other
    parts are the same with and without T5 (same seed: same weights). Its images are noise until trained."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from perceptual_diffusion.models.publish import publish_folder

    vocab = _char_vocab()

    def clip(width: int) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=32,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(config)

    def write(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer(tmp, vocab)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoders = (clip(32), clip(48))
            transformer = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=4,
                num_layers=4,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=96,
                caption_projection_dim=32,
                pooled_projection_dim=64,  # both projections, 32 + 32
                out_channels=4,
                pos_embed_max_size=16,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(16, 32),
                latent_channels=4,
                norm_num_groups=8,
                sample_size=16,
                scaling_factor=SD3_VAE_SCALING,
                shift_factor=SD3_VAE_SHIFT,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
            t5_tokenizer = _tiny_t5_tokenizer() if t5 else None
            t5_encoder = None
            if t5_tokenizer is not None:  # drawn last: the other parts are the folder without T5's
                t5_config = T5Config(
                    vocab_size=len(t5_tokenizer),
                    d_model=96,  # the transformer's joint_attention_dim
                    d_kv=16,
                    d_ff=64,
                    num_layers=2,
                    num_heads=2,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=32,
                    feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,
                    pad_token_id=t5_tokenizer.pad_token_id,
                    eos_token_id=t5_tokenizer.eos_token_id,
                    decoder_start_token_id=t5_tokenizer.pad_token_id,
                )
                t5_encoder = T5EncoderModel(t5_config)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizer,
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizer,
            text_encoder_3=t5_encoder,
            tokenizer_3=t5_tokenizer,
        )
        with quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)

    return publish_folder(Path(out_dir), write, force, kind="tiny-pipeline", command="latent tiny")


def write_shapes_captions(out_dir: str | Path, image_size: int = 16, every: int = 1) -> Path:
    """The built-in shapes data as a captioned folder (``000123.png`` + ``000123.txt``: "a red disc"), every
    ``every``-th valid image: caption data that ships with the project."""
    from PIL import Image

    from perceptual_diffusion.data.datasets import PALETTE_NAMES, SHAPE_CLASSES, shapes_valid_set, to_uint8

    data = shapes_valid_set(image_size)
    kept = range(0, len(data), every)
    names = [f"{i:06d}{suffix}" for i in kept for suffix in (".png", ".txt")]
    # The folder is claimed before anything is written: the user's own 000000.png is never replaced, and a rerun
    # with another --every removes the files of the earlier one, so the folder holds exactly what was asked for.
    earlier = ownership.read_marker(out_dir)
    out = ownership.claim_dir(out_dir, "shapes-captions", command="latent shapes-captions", files=names)
    for name in sorted(set(earlier.files if earlier and earlier.files else ()) - set(names)):
        (out / name).unlink(missing_ok=True)
    pixels = to_uint8(data.images)
    for i in kept:
        colour = PALETTE_NAMES[i % len(PALETTE_NAMES)]  # the valid set cycles the palette fastest
        Image.fromarray(pixels[i]).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(f"a {colour} {SHAPE_CLASSES[int(data.labels[i])]}\n")
    return out


def _tiny_components(vocab_size: int, seed: int) -> tuple:
    """A 2-layer CLIP text encoder, a 2-level UNet2DConditionModel with cross-attention and a 2x VAE, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=32,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
    return text_encoder, unet, vae
