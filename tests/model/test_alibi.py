"""ALiBi slopes (Press et al. 2022) and the position bias, against values derived by hand from the paper."""
import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.model.alibi import alibi_bias, alibi_slopes
from megagpt.model.gpt import SelfAttention
from megagpt.model.layers import LayerFactory


def _powers_of_two(exponents):
    return torch.tensor([2.0 ** e for e in exponents], dtype=torch.float32)


def test_power_of_two_slopes_follow_the_paper():
    # Paper, section 3: 8 heads -> 1/2^1 ... 1/2^8; 16 heads -> start and ratio 2^-0.5.
    torch.testing.assert_close(alibi_slopes(8), _powers_of_two([-k for k in range(1, 9)]), rtol=1e-7, atol=0)
    torch.testing.assert_close(alibi_slopes(16), _powers_of_two([-0.5 * k for k in range(1, 17)]),
                               rtol=1e-7, atol=0)


def test_non_power_of_two_slopes_interleave_the_next_power():
    # Reference-code rule: slopes of the closest smaller power of two, then every other slope of twice that.
    six = [-2, -4, -6, -8] + [-1, -3]  # 4 heads: 2^-2k; 8 heads [0::2]: 2^-1, 2^-3
    torch.testing.assert_close(alibi_slopes(6), _powers_of_two(six), rtol=1e-7, atol=0)
    twelve = [-k for k in range(1, 9)] + [-0.5, -1.5, -2.5, -3.5]  # 16 heads [0::2][:4]
    torch.testing.assert_close(alibi_slopes(12), _powers_of_two(twelve), rtol=1e-7, atol=0)
    for n in (3, 5, 6, 7, 12, 20, 24, 40):
        slopes = alibi_slopes(n)
        assert slopes.shape == (n,) and slopes.dtype == torch.float32
        assert len(set(slopes.tolist())) == n and bool(((slopes > 0) & (slopes < 1)).all())


@pytest.mark.parametrize("num_heads", [8, 16, 12, 20, 24, 40])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_slices_of_tensor_parallel_ranks_concatenate_to_the_full_slopes(num_heads, tp_size):
    per_rank = num_heads // tp_size
    slices = [alibi_slopes(num_heads, rank * per_rank, per_rank) for rank in range(tp_size)]
    assert torch.equal(torch.cat(slices), alibi_slopes(num_heads))


def test_attention_of_a_tensor_parallel_rank_takes_its_own_heads_slopes():
    class SecondOfTwoRanks(LayerFactory):
        tp_size, tp_rank = 2, 1

    config = ModelConfig(vocab_size=64, seq_len=16, d_model=48, num_layers=1, num_heads=6, head_dim=8)
    attention = SelfAttention(config, SecondOfTwoRanks())
    assert attention.num_heads == 3
    assert torch.equal(attention.slopes, alibi_slopes(6)[3:])


@pytest.mark.parametrize("bad", [dict(head_offset=-1, num_heads=2), dict(head_offset=6, num_heads=4),
                                 dict(head_offset=0, num_heads=0)])
def test_slice_outside_the_heads_is_rejected(bad):
    with pytest.raises(ValueError, match="not inside the 8 heads"):
        alibi_slopes(8, **bad)


def test_bias_matches_a_loop_over_absolute_positions():
    slopes = alibi_slopes(3).double()
    for seq_q, seq_k in [(7, 7), (3, 7), (1, 9)]:
        bias = alibi_bias(slopes, seq_q, seq_k)
        assert bias.shape == (3, seq_q, seq_k)
        for h in range(3):
            for r in range(seq_q):
                i = seq_k - seq_q + r  # queries are the last positions
                for j in range(seq_k):
                    assert bias[h, r, j].item() == pytest.approx(-slopes[h].item() * (i - j), abs=1e-12)
    with pytest.raises(ValueError, match="seq_q=5 must not exceed seq_k=4"):
        alibi_bias(slopes, 5, 4)


def test_compiled_forward_takes_the_slopes_on_the_model_device_without_a_copy():
    """Under torch.compile the slopes must come from the per-device cache, not from a host copy inside the graph
    (a host-to-device copy, a sync, per layer per micro batch on a GPU). On the meta device a CPU tensor among
    the compiled graph's inputs is such a copy; the model's own device is the only one allowed."""
    from megagpt.config import ModelConfig
    from megagpt.model import GPT

    config = ModelConfig(vocab_size=64, seq_len=16, d_model=32, num_layers=2, num_heads=2,
                         make_vocab_size_divisible_by=64)
    model = GPT(config).to("meta")
    graph_inputs = []

    def recording_backend(graph_module, example_inputs):
        graph_inputs.extend(example_inputs)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    assert compiled(torch.zeros(2, 16, dtype=torch.long, device="meta")).shape == (2, 16, 64)
    assert graph_inputs
    assert {str(t.device) for t in graph_inputs if isinstance(t, torch.Tensor)} == {"meta"}
