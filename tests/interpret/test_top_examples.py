import torch

from vlsae_ray.interpret import TopK


def test_streaming_topk_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(230, 12, generator=g)
    values[:, 3] = 1.0  # all tied: the earliest rows win
    top = TopK(5, 12)
    for start in range(0, 230, 37):
        top.update(values[start : start + 37])
    expected = torch.sort(values, dim=0, descending=True, stable=True)
    assert torch.equal(top.values_kf, expected.values[:5])
    assert torch.equal(top.rows_kf, expected.indices[:5])
    assert top.rows_kf[:, 3].tolist() == [0, 1, 2, 3, 4]
