import pytest
import torch

from sae_unlearn.saes.topk import topk_last_dim


@pytest.mark.parametrize("shape", [(300, 5120), (2, 7, 1024)])
def test_grouped_topk_selects_what_torch_topk_selects(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)  # float32: no ties, so the index sets must agree exactly
    values, indices = topk_last_dim(x, 64)
    ref_values, ref_indices = x.topk(64, dim=-1, sorted=False)
    assert values.shape == indices.shape == (*shape[:-1], 64)
    torch.testing.assert_close(indices.sort(-1).values, ref_indices.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(values, x.gather(-1, indices), rtol=0, atol=0)
    torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values, rtol=0, atol=0)


def test_grouped_topk_with_ties_and_clustered_maxima() -> None:
    x = (torch.randn(200, 5120) * 4).round().bfloat16()  # many ties
    packed = (torch.arange(8)[:, None] + torch.arange(8)[None, :] * 640).flatten()
    x[:, packed] += 100  # the whole top-64 packed into 8 groups (group g holds columns g, g + 640, ...)
    values, indices = topk_last_dim(x, 64)
    torch.testing.assert_close(values, x.gather(-1, indices), rtol=0, atol=0)
    assert torch.equal(values.float().sort(-1).values, x.topk(64, dim=-1).values.float().sort(-1).values)
    assert all(len(set(row)) == 64 for row in indices.tolist())


def test_widths_the_grouping_cannot_split_fall_back_to_torch() -> None:
    x = torch.randn(10, 517)
    assert torch.equal(topk_last_dim(x, 32)[1], x.topk(32, dim=-1, sorted=False).indices)


def test_sparse_encoding_through_the_grouped_path_equals_sae_lens_encode() -> None:
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_unlearn.saes.loading import encode_topk_sparse

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=1024, k=16, apply_b_dec_to_input=True))  # 128 groups >= 2k
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(3, 50, 64)
    result = encode_topk_sparse(sae, x)
    assert result is not None
    values, ids = result
    dense = torch.zeros(3, 50, 1024).scatter(-1, ids, values)
    torch.testing.assert_close(dense, sae.encode(x), rtol=0, atol=0)
