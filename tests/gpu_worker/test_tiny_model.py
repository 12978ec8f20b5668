import hashlib
from pathlib import Path

from services.gpu_worker.tiny_model import main, write_tiny_instruct_pix2pix


def digest(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = write_tiny_instruct_pix2pix(tmp_path / "again", seed=0)
    other = write_tiny_instruct_pix2pix(tmp_path / "other", seed=1)
    assert digest(again) == digest(Path(tiny_model_dir))
    assert digest(other) != digest(again)
    assert set(digest(again)) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }


def test_layout_matches_the_real_checkpoint(tiny_model_dir):
    import json

    index = json.loads((Path(tiny_model_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    unet = json.loads((Path(tiny_model_dir) / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 8


def test_command_line(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert (tmp_path / "cli" / "model_index.json").is_file()
    assert "written to" in capsys.readouterr().out


def test_tokenizer_is_byte_level(tiny_model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(Path(tiny_model_dir) / "tokenizer")
    ids = tok("print a logo").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "print a logo"


def test_sdxl_layout_matches_the_real_checkpoint(tiny_sdxl_dir):
    import json

    root = Path(tiny_sdxl_dir)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((root / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 8
    assert unet["addition_embed_type"] == "text_time"
    assert set(digest(root)) == {
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }


def test_command_line_writes_either_family(tmp_path, capsys):
    main([str(tmp_path / "xl"), "--family", "sdxl"])
    assert "tiny sdxl InstructPix2Pix" in capsys.readouterr().out
    assert (
        '"StableDiffusionXLInstructPix2PixPipeline"'
        in (tmp_path / "xl" / "model_index.json").read_text()
    )
