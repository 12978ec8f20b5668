"""Write a tiny random CLIP model (and its processor) to a directory.

    python -m services.datagen.tiny_clip DIR [--seed 0]

The result loads with `CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)`
like `openai/clip-vit-large-patch14`, so the image-pair stage's CLIP filter runs offline in
tests. Its scores are arbitrary numbers; only the filter's mechanics are meaningful with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from services.common.tiny_components import TEXT_HIDDEN, write_tokenizer

TINY_CLIP_IMAGE_SIZE = 32


def write_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    directory = Path(directory)
    vocab_size = write_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "image_size": TINY_CLIP_IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(directory)
    # The real checkpoints' preprocessing (resize the short side, center crop, CLIP's mean
    # and std), at the tiny model's resolution.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_clip(args.directory, args.seed)
    print(f"tiny CLIP model written to {path}")


if __name__ == "__main__":
    main()
