"""The embedded model's stand-in for a GPU machine that cannot download it (scripts/gpu_check.sh).

    python scripts/gpu_stand_in.py prepare CARRY_DIR   # here: config + tokenizer of the embedded model (~7 MiB)
    python scripts/gpu_stand_in.py build CARRY_DIR OUT_DIR [--device cuda]   # there: + random weights

The embedded model (Gemma 3 270M) comes as a ~250 MB GGUF package, more than a device run can carry. The
stand-in has its exact shapes and its tokenizer (so every stage sees the same tokens and does the same
work), with randomly initialised bf16 weights: wall times and speed ratios are the model's, the unlearning
and evaluation scores are meaningless. The shipped SAEs (same width) load onto it by directory.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

FILES = ("config.json", "generation_config.json", "tokenizer_config.json")


def prepare(carry: Path) -> None:
    from sae_unlearn.models.loading import convert_gguf_to_cache, embedded_gguf

    source = convert_gguf_to_cache(embedded_gguf("embedded"), "embedded")
    target = carry / "stand-in"
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    with (source / "tokenizer.json").open("rb") as src, gzip.open(target / "tokenizer.json.gz", "wb", 9) as dst:
        shutil.copyfileobj(src, dst)
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"stand-in files in {target}: {size / (1 << 20):.1f} MiB")


def build(carry: Path, out: Path, device: str = "cuda") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = carry / "stand-in"
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    with gzip.open(source / "tokenizer.json.gz", "rb") as src, (out / "tokenizer.json").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(0)
    with torch.device(device if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    print(f"stand-in model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) in {out}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "build":
        build(Path(sys.argv[2]), Path(sys.argv[3]), *(sys.argv[4:5] or ["cuda"]))
    else:
        sys.exit(__doc__)
