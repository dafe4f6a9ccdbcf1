from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.errors import UserError
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.methods import unlearn
from sae_unlearn.methods.base import method_config
from sae_unlearn.methods.preset import load_preset, model_family, preset_names
from sae_unlearn.saes.loading import load_saes_from_spec


def test_presets_are_data_with_the_published_numbers() -> None:
    assert {"crisp-paper", "clamp-paper"} <= set(preset_names())
    gemma = load_preset("crisp-paper", "gemma2")
    assert gemma.layers == [4, 6, 8, 10, 12, 14] and gemma.k == 10
    assert gemma.sae.split(",")[0] == "gemma-scope-2b-pt-res-canonical:layer_4/width_16k/canonical"
    assert gemma.options["lr"] == 1e-5 and gemma.options["margin_alpha"] == 5.0 and gemma.options["epochs"] == 1.0
    assert gemma.options["lora_layers"] == list(range(3, 10)) and gemma.options["lora_r"] == 4
    llama = load_preset("crisp-paper", "llama")
    assert (
        llama.layers == list(range(4, 29, 2)) and llama.options["margin_alpha"] == 30.0 and llama.options["lr"] == 2e-5
    )
    assert llama.sae.split(",")[-1] == "llama_scope_lxr_8x:l28r_8x"
    clamp = load_preset("clamp-paper", "gemma2")
    assert clamp.sae == "gemma-scope-2b-pt-res-canonical:layer_7/width_16k/canonical" and clamp.options["value"] == -100
    for preset in (gemma, llama, clamp):  # every option is one the method knows
        method_config(preset.method, preset.options)
    with pytest.raises(UserError, match="no settings for model family 'gpt2'"):
        load_preset("crisp-paper", "gpt2")
    with pytest.raises(UserError, match="unknown preset"):
        load_preset("crisp-fast", "llama")


def test_unlearn_with_a_preset_uses_its_options_under_explicit_ones(loaded, sae_dir, pack_dir, tmp_path: Path) -> None:
    assert model_family(loaded.model) == "llama"
    pack = load_pack(pack_dir)
    saes = load_saes_from_spec(str(sae_dir))
    selection = find_features(loaded, saes, pack, make_strategy("crisp", k=2, min_ratio=0.0), batch_size=4)
    explicit = {"lora_layers": [0, 1, 2], "max_length": 16, "checkpoint_every": 0, "batch_size": 2}
    run = unlearn(
        "crisp",
        loaded,
        pack,
        tmp_path / "run",
        options=explicit,
        saes=saes,
        sae_spec=str(sae_dir),
        features=selection,
        preset="crisp-paper",
    )
    config = json.loads((run / "config.json").read_text())
    options = config["options"]
    assert options["lr"] == 2e-5 and options["margin_alpha"] == 30.0 and options["objective"] == "published"
    assert options["lora_layers"] == [0, 1, 2] and options["batch_size"] == 2  # explicit wins
    steps = math.ceil(len(pack.forget_split("train")) / 2)  # one epoch over the deduplicated paragraphs
    assert config["result"]["steps_done"] == steps
    with pytest.raises(UserError, match="is for method crisp, not clamp"):
        unlearn("clamp", loaded, pack, tmp_path / "c", saes=saes, features=selection, preset="crisp-paper")


def test_crisp_reads_its_old_alpha_option_as_margin_alpha(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """CrispConfig.alpha (the published margin) is now margin_alpha: options, presets and experiment files
    that still say alpha keep working, with a deprecation warning; RMU's alpha (a retain weight) stays."""
    from sae_unlearn.evaluation.experiment import load_experiment

    with caplog.at_level(logging.WARNING):
        assert method_config("crisp", {"alpha": 7.0}).margin_alpha == 7.0
    assert "option alpha is deprecated, use margin_alpha" in caplog.text
    with pytest.raises(UserError, match="both alpha and margin_alpha"):
        method_config("crisp", {"alpha": 7.0, "margin_alpha": 5.0})
    assert method_config("rmu", {"alpha": 7.0}).alpha == 7.0
    preset = load_preset("crisp-paper", "llama")
    assert preset.merged_options({"alpha": 12.0})["margin_alpha"] == 12.0  # an explicit old name still wins
    path = tmp_path / "exp.toml"
    path.write_text("[method_options.crisp]\nalpha = 9.0\nsteps = 3\n")
    assert load_experiment(path).compare.method_options["crisp"] == {"margin_alpha": 9.0, "steps": 3}
