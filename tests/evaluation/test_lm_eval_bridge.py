"""Tests for the lm-eval bridge on a tiny random Llama and a local multiple-choice task (offline, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.lm_eval_bridge import run_lm_eval

pytest.importorskip("lm_eval", reason="optional: pip install lm-eval==0.4.13")

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK_NAME = "sae_unlearn_local_mc"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the task's own text, so any string encodes without <unk>."""
    docs = [json.loads(line) for line in (TASK_DIR / f"{TASK_NAME}.jsonl").read_text().splitlines() if line]
    corpus = [f"Question: {d['question']}\nAnswer: {' '.join(d['choices'])}" for d in docs]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def include_dir(tmp_path: Path) -> Path:
    """Copy the task YAML into tmp_path with an absolute data path and a private datasets cache."""
    config = yaml.safe_load((TASK_DIR / f"{TASK_NAME}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / f"{TASK_NAME}.jsonl")
    config["dataset_kwargs"]["cache_dir"] = str(tmp_path / "hf_datasets_cache")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(config))
    return task_dir


def _loglikelihoods(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> list[float]:
    """Per-choice log-likelihoods through lm-eval's own HFLM wrapper of the in-memory model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    context = "Question: What is the capital of France?\nAnswer:"
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, f" {choice}"), idx=i)
        for i, choice in enumerate(["Berlin", "Madrid", "Paris", "Rome"])
    ]
    return [ll for ll, _ in hflm.loglikelihood(requests)]


def _add_constant_hook(_module: torch.nn.Module, _inputs: object, output: object) -> object:
    if isinstance(output, tuple):
        return (output[0] + 100.0, *output[1:])
    return output + 100.0  # type: ignore[operator]


def test_local_task_accuracy_and_hooks_fire(model, tokenizer, include_dir) -> None:
    calls = []
    handle = model.model.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        results = run_lm_eval(model, tokenizer, [TASK_NAME], limit=8, include_path=str(include_dir), batch_size=4)
    finally:
        handle.remove()
    metrics = results[TASK_NAME]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert 0.0 <= metrics["acc_norm,none"] <= 1.0
    assert all(isinstance(v, float) and "," in k for k, v in metrics.items())
    assert calls, "the forward hook on the decoder block never ran inside lm-eval"


def test_forward_hook_changes_loglikelihoods(model, tokenizer) -> None:
    baseline = _loglikelihoods(model, tokenizer)
    handle = model.model.layers[-1].register_forward_hook(_add_constant_hook)
    try:
        hooked = _loglikelihoods(model, tokenizer)
    finally:
        handle.remove()
    assert max(abs(a - b) for a, b in zip(baseline, hooked, strict=True)) > 1e-3
    assert _loglikelihoods(model, tokenizer) == pytest.approx(baseline, abs=1e-5)


def test_peft_adapter_is_active(model, tokenizer) -> None:
    peft = pytest.importorskip("peft")
    baseline = _loglikelihoods(model, tokenizer)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    try:
        adapted = _loglikelihoods(wrapped, tokenizer)
    finally:
        wrapped.unload()  # restore the shared module-scoped model
    assert max(abs(a - b) for a, b in zip(baseline, adapted, strict=True)) > 1e-4


def test_unknown_task_raises_user_error(model, tokenizer) -> None:
    with pytest.raises(UserError, match="no_such_task_xyz") as info:
        run_lm_eval(model, tokenizer, ["no_such_task_xyz"], limit=1)
    assert "--tasks list" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_lm_eval_raises_user_error(model, tokenizer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError, match=r"pip install lm-eval==0\.4\.13"):
        run_lm_eval(model, tokenizer, [TASK_NAME])
