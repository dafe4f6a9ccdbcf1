from __future__ import annotations

from pathlib import Path

import pytest

from sae_unlearn.errors import UserError
from sae_unlearn.models.loading import load_model, resolve_device, resolve_dtype


def test_unknown_model_name() -> None:
    with pytest.raises(UserError, match="unknown model 'not-a-model'") as e:
        load_model("not-a-model")
    assert "\n" not in str(e.value)


def test_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert bad.read_bytes().startswith(b"this is not")  # the user's file is untouched


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_hub_unreachable_names_offline_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model-xyz")


def test_local_directory_round_trip(tmp_path: Path, tokenizer) -> None:
    from tests.conftest import tiny_model

    model = tiny_model("qwen2", len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    assert loaded.n_layers == 4 and loaded.d_model == 64 and not any(p.requires_grad for p in loaded.model.parameters())


def test_dtype_and_device_options() -> None:
    import torch

    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")


def test_gated_hub_model_says_accept_the_licence_and_log_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def gated(*_a, **_k):  # what transformers raises for a gated repo without access
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at https://hf.co/x.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(UserError, match=r"gated.*licence") as e:
        load_model("google/gemma-2-2b")
    assert "huggingface-cli login" in str(e.value) and "HF_TOKEN" in str(e.value) and "check the id" not in str(e.value)


def test_revision_is_passed_to_the_hub_and_keys_the_source(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    import transformers

    from tests.conftest import tiny_model

    seen: list[str | None] = []

    def fake(kind):
        def from_pretrained(source, *_a, revision=None, **_k):
            seen.append(revision)
            return tokenizer if kind == "tok" else tiny_model("llama", len(tokenizer))

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tok"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    pinned = load_model("org/model@abc123", dtype="float32")
    assert seen == ["abc123", "abc123"] and pinned.source == "org/model@abc123" and pinned.spec == "org/model@abc123"
    assert load_model("org/model", dtype="float32", revision="v2").source == "org/model@v2"
    assert load_model("org/model", dtype="float32").source == "org/model"
    with pytest.raises(UserError, match="two revisions"):
        load_model("org/model@a", revision="b")
