"""Fixtures shared by the method tests."""

from __future__ import annotations

import pytest

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.features import find_features, make_strategy
from sae_unlearn.saes.loading import load_saes_from_spec


@pytest.fixture
def setup(loaded, sae_dir, pack_dir):
    """(loaded tiny model, its SAEs, the test pack, a CRISP selection of 4 features per layer, SAE spec)."""
    saes = load_saes_from_spec(str(sae_dir))
    pack = load_pack(pack_dir)
    selection = find_features(
        loaded, saes, pack, make_strategy("crisp", k=4, min_ratio=0.0), batch_size=4, with_examples=False
    )
    return loaded, saes, pack, selection, str(sae_dir)
