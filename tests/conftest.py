"""Tiny models, tokenizers, SAEs and concept packs built in the tests (offline, seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sae_unlearn.models.loading import LoadedModel

FORGET = [
    f"The wizard Zorbo lives in the tower of Quendor and casts the spell {w} every night."
    for w in (
        "Flarix",
        "Glimmo",
        "Brastok",
        "Veltrum",
        "Omnix",
        "Krandel",
        "Sorvid",
        "Tamblin",
        "Lurvex",
        "Pendro",
        "Wystan",
        "Cadrel",
    )
]
RETAIN = [
    f"The farmer {n} lives in the village and grows {c} in the spring."
    for n, c in (
        ("Anna", "wheat"),
        ("Ben", "barley"),
        ("Cara", "oats"),
        ("Dan", "corn"),
        ("Eve", "beans"),
        ("Finn", "peas"),
        ("Gia", "rye"),
        ("Hal", "hops"),
        ("Ivy", "flax"),
        ("Jon", "kale"),
        ("Kim", "leeks"),
        ("Lou", "onions"),
    )
]

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    "gemma2": {"model_type": "gemma2", "head_dim": 16},
    "gemma3_text": {"model_type": "gemma3_text", "head_dim": 16},
    "gpt2": {"model_type": "gpt2"},
}


def make_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the test texts; with BOS prepended like the real tokenizers, or
    without (GPT-2 / Qwen / SmolLM2: the first text token is the attention sink)."""
    from tokenizers import processors

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(FORGET + RETAIN + ["Question: Answer: A. B. C. D."], trainer=trainer)
    if not with_bos:
        return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(with_bos=True)


def tiny_model(family: str, vocab_size: int, n_layers: int = 4, seed: int = 0) -> Any:
    from transformers import AutoConfig

    torch.manual_seed(seed)
    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    if model_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256
        )
    else:
        config = AutoConfig.for_model(
            model_type,
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            **kw,
        )
    config.pad_token_id = 2
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def loaded(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    model = tiny_model("llama", len(tokenizer))
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, "tiny-llama", "tiny-llama", 0.0)


def tiny_sae(layer: int, d_in: int = 64, d_sae: int = 128, k: int = 8, seed: int = 0) -> Any:
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu")
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
        sae.b_dec.zero_()
    return sae.requires_grad_(False)


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    root = tmp_path / "saes"
    for layer in (1, 2):
        tiny_sae(layer, seed=layer).save_model(str(root / f"blocks.{layer}.hook_resid_post"))
    return root


def write_pack(root: Path, probes: list[dict[str, Any]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "forget.txt").write_text("\n\n".join(FORGET * 6))
    (root / "retain.txt").write_text("\n\n".join(RETAIN * 6))
    (root / "coherence.txt").write_text("The wizard Zorbo is a common name.\nA farmer lives in the village.\n")
    probes = probes or [
        {
            "id": f"t{i}",
            "prompt": "Where does Zorbo live?",
            "answer": "Quendor",
            "distractors": ["Ben", "Anna", "Eve"],
            "ring": ring,
        }
        for i, ring in enumerate(["target", "target", "near", "mid", "far"])
    ]
    (root / "probes.jsonl").write_text("\n".join(json.dumps(p) for p in probes) + "\n")
    (root / "concept.toml").write_text(
        'name = "zorbo"\ndescription = "a made-up wizard"\n'
        + "".join(
            f'[files.{k}]\npath = "{k}.{ext}"\n'
            for k, ext in (("forget", "txt"), ("retain", "txt"), ("coherence", "txt"), ("probes", "jsonl"))
        )
    )
    return root


@pytest.fixture
def pack_dir(tmp_path: Path) -> Path:
    return write_pack(tmp_path / "pack")


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests get an empty cache each; integration tests keep the shared one (converted models)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("SAE_UNLEARN_CACHE", str(tmp_path / "cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests skip where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block tiny Llama saved as a model directory, shared by a module's tests."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    tiny_model("llama", len(tokenizer), n_layers=4).save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return root


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny Llama saved as a local model directory (what --model takes)."""
    root = tmp_path / "tiny-model"
    tiny_model("llama", len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
