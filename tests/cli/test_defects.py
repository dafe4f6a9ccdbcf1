"""The small defects of issue 16, each pinned by a test."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.errors import UserError
from sae_unlearn.evaluation.evaluate import EvalConfig, select_probes
from sae_unlearn.features.statistics import LayerStats, load_stats, save_stats


def test_select_probes_without_probes_is_a_user_error(pack_dir: Path) -> None:
    with pytest.raises(UserError, match="no probes to evaluate in --probes"):
        select_probes(None, [], EvalConfig())
    pack = load_pack(pack_dir)
    empty = EvalConfig(probe_split="all")
    pack_without = type(pack)(**{**pack.__dict__, "probes": []})
    with pytest.raises(UserError, match="'all' split"):
        select_probes(pack_without, None, empty)


def _stats(seed: int) -> dict[int, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    return {
        layer: LayerStats(layer, *(torch.rand(16, generator=g) for _ in range(6)), 100 + seed, 200 + seed)
        for layer in (1, 2)
    }


def test_save_stats_is_one_atomic_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache" / "key.safetensors"
    first = _stats(0)
    save_stats(path, first)
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.safetensors"]  # no sidecar to lose
    loaded = load_stats(path)
    assert loaded[2].retain_tokens == 200 and torch.equal(loaded[1].forget_sum, first[1].forget_sum)

    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_stats(path, _stats(1))
    # the crash left the earlier cache whole and no temporary file behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.safetensors"]
    assert load_stats(path)[1].forget_tokens == 100


def test_setup_logging_keeps_numerical_warnings() -> None:
    from sae_unlearn.cli.common import setup_logging

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging(False)
        for category, module in [
            (RuntimeWarning, "torch.nn.functional"),
            (UserWarning, "sae_lens.saes.sae"),
            (UserWarning, "sae_unlearn.methods.crisp"),
            (FutureWarning, "transformers.modeling_utils"),
            (DeprecationWarning, "sae_lens.load_model"),
        ]:
            warnings.warn_explicit(f"{module} says", category, "x.py", 1, module=module)
    shown = {str(w.message) for w in caught}
    assert shown == {"torch.nn.functional says", "sae_lens.saes.sae says", "sae_unlearn.methods.crisp says"}


def test_chat_reads_the_adapter_once(loaded, sae_dir: Path, pack_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from peft import PeftModel

    from sae_unlearn.cli.chat import ChatSession
    from sae_unlearn.features import find_features, make_strategy
    from sae_unlearn.methods import apply, unlearn
    from sae_unlearn.models.generation import generate
    from sae_unlearn.saes.loading import load_saes_from_spec

    saes = load_saes_from_spec(str(sae_dir))
    pack = load_pack(pack_dir)
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=4, with_examples=False
    )
    options = {"steps": 3, "batch_size": 2, "max_length": 32, "fluency_every": 0, "lr": 5e-2}
    run = unlearn(
        "crisp", loaded, pack, tmp_path / "run", options=options, saes=saes, sae_spec=str(sae_dir), features=selection
    )
    prompt = "The wizard Zorbo"
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    base_text = generate(loaded.model, loaded.tokenizer, [prompt], 6)[0]
    with apply(loaded, run) as model:
        unlearned_text = generate(model, loaded.tokenizer, [prompt], 6)[0]

    reads = []
    original = PeftModel.from_pretrained

    def counting(*args, **kwargs):
        reads.append(args[1] if len(args) > 1 else kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", counting)
    session = ChatSession(loaded, run)
    replies = [session.reply(prompt, unlearned, 6, 0.0) for unlearned in (True, False, True, True, False)]
    session.close()
    assert len(reads) == 1
    assert unlearned_text != base_text
    assert replies == [unlearned_text, base_text, unlearned_text, unlearned_text, base_text]
    with torch.no_grad():  # closing the session left the base model as it was
        after = loaded.model(input_ids=ids).logits
    assert not isinstance(loaded.model, PeftModel) and torch.equal(before, after)
