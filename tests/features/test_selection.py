from __future__ import annotations

import pytest
import torch

from sae_unlearn.concepts.pack import load_pack
from sae_unlearn.errors import UserError
from sae_unlearn.features import find_features
from sae_unlearn.features.selection import make_strategy
from sae_unlearn.features.statistics import LayerStats, compute_stats
from sae_unlearn.saes.loading import load_saes_from_spec


def stats(fc, rc, fs, rs, n_f=100, n_r=100) -> LayerStats:
    t = lambda v: torch.tensor(v, dtype=torch.float)  # noqa: E731
    return LayerStats(0, t(fc), t(rc), t(fs), t(rs), t(fs), t(rs), n_f, n_r)


def test_crisp_rule_by_hand() -> None:
    # freq_diff = [9, 8, 5, -1]; relative = fs/(rs+1) = [1.0, 8.0, 5.0, 0.0]
    s = stats([10, 9, 5, 0], [1, 1, 0, 1], [10, 16, 5, 0], [9, 1, 0, 5])
    chosen = make_strategy("crisp", k=2).select({0: s})
    assert [f.index for f in chosen] == [1, 2]  # 0 fails the ratio >= 3, 3 has a negative difference
    assert chosen[0].relative == pytest.approx(8.0)
    assert [f.index for f in make_strategy("crisp", k=2, min_ratio=0.5).select({0: s})] == [0, 1]
    # the optional retain-density cap: feature 1 fires on 1% of retain tokens, 0.5% is allowed
    assert [f.index for f in make_strategy("crisp", k=2, max_retain_rate=0.005).select({0: s})] == [2]


def test_crisp_balances_corpus_sizes() -> None:
    # the retain corpus is 4x larger: its counts are scaled down before the difference is taken
    s = stats([10, 10], [8, 36], [10, 10], [0, 0], n_f=100, n_r=400)  # unbalanced diffs would be 2 and -26
    assert [f.index for f in make_strategy("crisp", k=2, min_ratio=0).select({0: s})] == [0, 1]


def test_saebench_rule_by_hand() -> None:
    s = stats([50, 40, 30], [5, 0, 0], [1, 1, 1], [1, 1, 1], n_f=100, n_r=100)
    # feature 0 fires on 5% of retain tokens > 1%: dropped; then rank by forget rate
    assert [f.index for f in make_strategy("saebench", k=2).select({0: s})] == [1, 2]


def test_inlp_rule_by_hand() -> None:
    s = stats([20, 20, 60, 1], [0, 10, 0, 0], [40, 20, 60, 1], [0, 10, 1, 1], n_f=100, n_r=100)
    chosen = make_strategy("inlp", k=3).select({0: s})
    # 1: retain rate 0.10 > 0.05; 2: forget rate 0.6 > 0.5; 3: fewer than 5 firings
    assert [f.index for f in chosen] == [0]
    ft, fr = 0.2, 0.0
    ratio = (ft + 1e-4) / (fr + 1e-4)
    act_ratio = (2.0 + 1e-4) / (0.0 + 1e-4)
    expected = (ft - fr) * torch.log1p(torch.tensor(ratio)) * torch.log1p(torch.tensor(act_ratio))
    assert chosen[0].score == pytest.approx(float(expected), rel=1e-5)


def test_strategy_errors() -> None:
    with pytest.raises(UserError, match="unknown selection strategy"):
        make_strategy("magic")
    with pytest.raises(UserError, match="has no parameter 'alpha'"):
        make_strategy("crisp", alpha=3)
    with pytest.raises(UserError, match="larger than the SAE width"):
        make_strategy("crisp", k=10).select({0: stats([1] * 4, [0] * 4, [1] * 4, [0] * 4)})


def test_statistics_mask_bos_and_padding(loaded, sae_dir) -> None:
    saes = load_saes_from_spec(str(sae_dir))
    texts_f, texts_r = ["a b c d e", "a"], ["x y"]
    result = compute_stats(loaded, saes, texts_f, texts_r, batch_size=2, use_cache=False)
    n_valid = sum(len(loaded.tokenizer(t).input_ids) - 1 for t in texts_f)  # minus BOS, no padding
    assert result[1].forget_tokens == n_valid
    k = saes[0].sae.cfg.k
    assert float(result[1].forget_count.sum()) <= k * n_valid


def test_sparse_statistics_equal_dense_encoding(loaded, sae_dir) -> None:
    """The TopK fast path (never densified) gives exactly the numbers of SAELens' dense encode."""
    from sae_unlearn.features.statistics import encode_layers, iter_batches

    saes = load_saes_from_spec(str(sae_dir))
    texts_f, texts_r = ["a b c d e f g", "a c", "b b b d"], ["x y", "y z x w"]
    result = compute_stats(loaded, saes, texts_f, texts_r, batch_size=2, use_cache=False)
    for side, texts in (("forget", texts_f), ("retain", texts_r)):
        zs = {s.layer: [] for s in saes}
        for batch in iter_batches(texts, loaded.tokenizer, 2, 256):
            latents, mask = encode_layers(loaded, saes, batch)
            for layer, z in latents.items():
                zs[layer].append(z[mask])
        for layer, chunks in zs.items():
            z = torch.cat(chunks)
            got = result[layer]
            assert torch.equal(getattr(got, f"{side}_count"), (z > 0).sum(0).float())
            torch.testing.assert_close(getattr(got, f"{side}_sum"), z.sum(0))
            torch.testing.assert_close(getattr(got, f"{side}_max"), z.max(0).values.clamp(min=0))


def test_statistics_cache_invalidation(loaded, sae_dir, monkeypatch) -> None:
    saes = load_saes_from_spec(str(sae_dir))
    calls = []
    import sae_unlearn.features.statistics as st

    original = st.encode_valid_tokens
    monkeypatch.setattr(st, "encode_valid_tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
    compute_stats(loaded, saes, ["a b"], ["c d"], batch_size=1)
    n = len(calls)
    compute_stats(loaded, saes, ["a b"], ["c d"], batch_size=1)
    assert len(calls) == n  # cached
    compute_stats(loaded, saes, ["a b", "e"], ["c d"], batch_size=1)
    assert len(calls) > n  # corpus changed
    m = len(calls)
    compute_stats(loaded, saes, ["a b", "e"], ["c d"], batch_size=1, use_cache=False)
    assert len(calls) > m


def test_find_features_end_to_end(loaded, sae_dir, pack_dir, tmp_path) -> None:
    saes = load_saes_from_spec(str(sae_dir))
    pack = load_pack(pack_dir)
    selection = find_features(loaded, saes, pack, make_strategy("crisp", k=3, min_ratio=0.0), batch_size=4)
    assert selection.features and all(f.layer in (1, 2) for f in selection.features)
    selection.write(tmp_path / "out")
    from sae_unlearn.features import load_features

    again = load_features(tmp_path / "out")
    assert [(f.layer, f.index) for f in again.features] == [(f.layer, f.index) for f in selection.features]
    assert (tmp_path / "out" / "report.html").read_text().count('class="card"') >= 1
