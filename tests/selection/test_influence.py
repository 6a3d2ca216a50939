"""megagpt/selection (influence): the projected fast path against the exact float64 reference, the default projection
size's rank correlation, the factored Adam preconditioner, and the refusals of bad input."""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from influence_testing import SEQ_LEN, counting_documents, train_test_model
from megagpt.selection.adam import adam_factors
from megagpt.selection.influence import document_scores, stream_pieces, validation_sum
from megagpt.selection.influence_reference import ReferenceCheckpoint, reference_influence
from megagpt.selection.influence_run import DEFAULT_PROJECTION_DIM
from megagpt.selection.projection import ProjectedGradients, gradient_blocks, projection_matrix

VALID = (7 + np.arange(120)) % 60  # counts up in steps of 1: documents counting in steps of 1 help it


def fast_influence(checkpoints, documents, valid, projection_dim, cosine=False, seed=0, batch_size=5):
    """The fast path as tools/influence.py runs it, for ReferenceCheckpoint-like inputs."""
    total = np.zeros(len(documents))
    for checkpoint in checkpoints:
        plain = ProjectedGradients(checkpoint.model, projection_dim, seed)
        train = plain if checkpoint.factors is None else ProjectedGradients(checkpoint.model, projection_dim, seed,
                                                                            checkpoint.factors)
        pieces = stream_pieces(valid, SEQ_LEN)
        mean = validation_sum(plain, pieces, batch_size, cosine) / len(pieces)
        total += checkpoint.lr * document_scores(train, documents, mean, SEQ_LEN, batch_size, cosine)
    return total


def _factors(model, optimizer, step):
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: dict(optimizer.state[p]) for p in model.parameters()}
    return adam_factors(gradient_blocks(model), moments, step, beta2=0.99, eps=1e-8)


@pytest.fixture(scope="module")
def runs():
    """Two checkpoints of one training run of the test model (30 and 60 steps) with their AdamW states."""
    return {steps: train_test_model(steps) for steps in (30, 60)}


@pytest.mark.parametrize("overrides,cosine,adam", [
    ({}, False, False), ({"tied_embeddings": False, "position": "learned", "bias": True}, True, True)],
    ids=["tied-alibi-plain", "untied-learned-bias-cosine-adam"])
def test_without_projection_the_fast_path_equals_the_reference(overrides, cosine, adam, runs):
    checkpoints = []
    for steps, lr in ((30, 2e-3), (60, 3e-4)):
        model, optimizer = runs[steps] if not overrides else train_test_model(steps, **overrides)
        checkpoints.append(ReferenceCheckpoint(model, lr, _factors(model, optimizer, steps) if adam else None))
    documents = counting_documents(8, 3) + [np.array([5])]  # the last has no target
    valid = VALID[:40]
    exact = reference_influence(checkpoints, documents, valid, SEQ_LEN, cosine)
    fast = fast_influence(checkpoints, documents, valid, None, cosine)
    assert np.isnan(exact[-1]) and np.isnan(fast[-1])
    rel = np.linalg.norm(fast[:-1] - exact[:-1]) / np.linalg.norm(exact[:-1])
    assert rel < 1e-5, rel
    assert np.abs(exact[:-1]).min() > 0  # the comparison is not of zeros


@pytest.mark.slow  # about 15 s of CPU: 40 exact float64 per-document gradients, 4 projected runs
def test_the_default_projection_ranks_documents_as_the_reference(runs):
    """Spearman >= 0.9 with the exact scores at the default projection size (16 per side), on average over
    projection seeds and for the default seed 0."""
    model, _ = runs[60]
    documents = counting_documents(40, 2)
    exact = reference_influence([ReferenceCheckpoint(model, 1.0)], documents, VALID, SEQ_LEN)
    correlations = [spearmanr(fast_influence([ReferenceCheckpoint(model, 1.0)], documents, VALID,
                                             DEFAULT_PROJECTION_DIM, seed=seed, batch_size=16), exact).statistic
                    for seed in range(3)]
    assert correlations[0] >= 0.9 and np.mean(correlations) >= 0.9, correlations
    # the projection is doing something: 4 per side ranks clearly worse than 16
    small = spearmanr(fast_influence([ReferenceCheckpoint(model, 1.0)], documents, VALID, 2, batch_size=16),
                      exact).statistic
    assert small < min(correlations), (small, correlations)


def test_factored_adam_preconditioner_is_exact_for_a_rank_one_second_moment():
    torch.manual_seed(0)
    model, _ = train_test_model(1)
    blocks = gradient_blocks(model)
    moments = {}
    for block in blocks:
        rows, cols = torch.rand(block.rows) + 0.1, torch.rand(block.cols) + 0.1
        v = torch.outer(rows, cols)
        moments[block.name] = {"exp_avg_sq": v[:, :block.features[1]]}
        if block.bias:
            moments[block.bias] = {"exp_avg_sq": v[:, -1]}
    factors = adam_factors(blocks, moments, step=10, beta2=0.9, eps=1e-8)
    for block in blocks:
        a, b = factors[block.name]
        v = moments[block.name]["exp_avg_sq"].double()
        if block.bias:
            v = torch.cat([v, moments[block.bias]["exp_avg_sq"].double()[:, None]], 1)
        torch.testing.assert_close(torch.outer(a, b), (v / (1 - 0.9 ** 10)).rsqrt(), rtol=1e-6, atol=0)


def test_projections_are_seeded_by_name_and_side_only():
    a = projection_matrix(64, 8, 3, "layers.1.mlp.fc.weight", "rows")
    assert torch.equal(a, projection_matrix(64, 8, 3, "layers.1.mlp.fc.weight", "rows"))
    assert not torch.equal(a, projection_matrix(64, 8, 3, "layers.1.mlp.fc.weight", "cols"))
    assert not torch.equal(a, projection_matrix(64, 8, 4, "layers.1.mlp.fc.weight", "rows"))


def test_a_projection_larger_than_a_layer_is_refused():
    model, _ = train_test_model(1)
    with pytest.raises(ValueError, match=r"--projection-dim 33 is larger than the layer it projects: "
                                         r"layers.0.word_embeddings.weight is 64 x 32; use at most 32"):
        ProjectedGradients(model, 33)
    with pytest.raises(ValueError, match="integer >= 1"):
        ProjectedGradients(model, 0)


def test_adam_needs_fp32_second_moments():
    model, _ = train_test_model(1)
    blocks = gradient_blocks(model)
    eight_bit = {b.name: {"state1": torch.zeros(1), "state2": torch.zeros(1)} for b in blocks}
    with pytest.raises(ValueError, match=r"ck has no fp32 Adam second moment \(exp_avg_sq\) for "
                                         r"layers.0.word_embeddings.weight \(its optimizer state: \['state1'"):
        adam_factors(blocks, eight_bit, 5, 0.99, 1e-8, source="ck")
