"""Exit rules on synthetic probability grids, hand-checked. States are log-probabilities read by identity
linear heads, so the head at layer l on sentence k returns exactly P[k, l]."""

from __future__ import annotations

import numpy as np
import pytest

from edge2dexit.document import Document
from edge2dexit.policies import Accumulator, Step, make_policy, paper2d_steps, policy_names

from fakes import FakeExecutor
from helpers import all_heads, grid, identity_heads, run, write_store


def test_accumulator_ignores_low_confidence_and_stops_on_excess():
    acc = Accumulator(2, tau_ignore=0.3, tau_acc=1.0)
    assert not acc.add(np.array([0.4, 0.6]))  # margin 0.2 ≤ τ_ignore: ignored
    assert acc.totals.tolist() == [0.0, 0.0]
    assert not acc.add(np.array([0.2, 0.8]))  # +0.6 to class 1
    assert acc.add(np.array([0.1, 0.9]))  # +0.8: 1.4 > τ_acc
    assert acc.winner == 1 and acc.totals[1] == pytest.approx(1.4)


def test_accumulator_needs_strictly_more_than_tau_acc_and_ties_go_to_lower_class():
    acc = Accumulator(2, tau_ignore=0.0, tau_acc=0.5)
    assert not acc.add(np.array([0.75, 0.25]))  # exactly 0.5 is not > 0.5
    assert acc.totals.tolist() == [0.5, 0.0] and acc.winner is None
    # A cell where two classes tie for the top has margin 0. With τ_ignore < 0 it still counts, and with τ_acc < 0
    # adding its 0 makes the class it went to win at once: that class must be the lower index of the tied pair.
    for p, lower in (([0.4, 0.4, 0.2], 0), ([0.2, 0.4, 0.4], 1), ([0.3, 0.1, 0.3, 0.3], 0)):
        tie = Accumulator(len(p), tau_ignore=-1.0, tau_acc=-0.5)
        assert tie.add(np.array(p)), p
        assert tie.winner == lower, p
        decision = tie.decision(np.array(p), sentence=2, layer=7, read=3, basis=None)
        assert decision.label_index == lower and decision.fired  # the cell that won answers: its top class
    # a tie that does not clear τ_ignore is ignored
    ignored = Accumulator(2, tau_ignore=0.0, tau_acc=-0.5)
    assert not ignored.add(np.array([0.5, 0.5])) and ignored.winner is None


def test_paper2d_schedule():
    assert paper2d_steps(12, 30)[:3] == [Step(0, 2, 0), Step(1, 4, 2), Step(2, 6, 4)]
    assert paper2d_steps(12, 30)[-1] == Step(11, 24, 22)
    steps = paper2d_steps(40, 30)  # Δ = 1: depth grows one layer per sentence, capped at L
    assert steps[29] == Step(29, 30, 29) and steps[35] == Step(35, 30, 35)


def test_paper2d_stops_at_the_firing_cell_and_counts_real_cost():
    # m=3, L=6, Δ=2. Cell order: s0 l0-1 | s0 l2-3, s1 l0-3 | s0 l4-5, s1 l4-5, s2 l0-5.
    m = np.full((3, 6), 0.1)  # below τ_ignore everywhere…
    m[0, 5] = 0.6  # …but s0 at l5 (+0.6)
    m[1, 4] = 0.7  # and s1 at l4 (+0.7 → 1.3 > τ_acc): fires during step 2's re-decode of s1
    decision, doc = run("paper2d", grid(*m), [2, 3, 4], tau_ignore=0.2, tau_acc=1.0)
    assert decision.fired and decision.label_index == 1
    assert (decision.exit_sentence, decision.exit_layer) == (1, 4)
    # the paper counts 2 + 6 + 3 = 11 cells; the engine computed s0 to 6 layers and s1 to 5, s2 never
    assert doc.operations == 11
    # real cost: s0@2 (2·2) + s0@4 (2·4) + s1@4 (3·4) + s0@6 (2·6) + s1 stopped after layer 4 (3·5)
    assert doc.token_layers == 4 + 8 + 12 + 12 + 15


def test_paper2d_fallback_deepens_to_the_last_layer():
    m = np.full((3, 8), -0.05)
    m[2, 7] = 0.3
    decision, doc = run("paper2d", grid(*m), [1, 1, 1], tau_ignore=0.5, tau_acc=1.0)
    assert not decision.fired and decision.label_index == 1 and decision.exit_layer == 7
    assert doc.valid_depths == (8, 8, 8) and doc.operations == 3 * 8
    # Δ = 2, one token per sentence: s0@2 | s0@4, s1@4 | s0@6, s1@6, s2@6 | fallback: all three @8
    assert doc.token_layers == 2 + (4 + 4) + (6 + 6 + 6) + 3 * 8


def test_sentence_policy_accumulates_at_the_last_layer():
    m = np.zeros((4, 3))
    m[:, 2] = [0.6, -0.4, 0.6, 0.9]
    decision, doc = run("sentence-vote", grid(*m), [3, 3, 3, 3], tau_ignore=0.5, tau_acc=1.0)
    assert decision.fired and decision.exit_sentence == 2 and decision.label_index == 1
    assert doc.token_layers == 3 * 3 * 3 and doc.n_sentences == 3


def test_layer_policy_on_the_last_sentence_or_the_mean_of_all():
    m = np.array([[0.9, 0.9, 0.9, 0.9], [0.0, 0.1, -0.8, -0.9]])
    fixed, doc = run("layer", grid(*m), [2, 2], layer=1)
    assert fixed.exit_layer == 1 and fixed.label_index == 1 and doc.token_layers == 4 * 2
    assert doc.decode_calls == 1 and fixed.boundary_gap == pytest.approx(0.1)  # the last sentence's margin: a tie gap
    pooled, doc = run("layer", grid(*m), [2, 2], layer=1, pooling="prefix")  # mean of both sentences
    P = grid(*m)[:, 1]
    want = np.sqrt(P[0] * P[1])
    np.testing.assert_allclose(pooled.probabilities, want / want.sum(), rtol=1e-5)


def test_full_policy_reads_everything_once():
    m = np.array([[0.9, 0.9], [0.2, -0.6]])
    decision, doc = run("full", grid(*m), [5, 5])
    assert decision.label_index == 0 and decision.exit_layer == 1 and not decision.fired
    assert doc.token_layers == 10 * 2 and doc.operations == 4 and doc.decode_calls == 1


def test_prefix_mean_stops_on_the_prefix_mean_after_min_sentences():
    m = np.zeros((4, 6))
    m[:, 3] = [0.95, 0.95, 0.95, 0.95]
    decision, doc = run("prefix-mean", grid(*m), [2, 2, 2, 2], layer=3, threshold=0.9, min_sentences=2)
    assert decision.fired and decision.exit_sentence == 1 and decision.exit_layer == 3
    assert doc.token_layers == 2 * 2 * 4 and doc.operations == 2 * 4


def test_prefix_mean_of_log_probabilities():
    m = np.zeros((2, 2))
    m[:, 1] = [0.8, -0.4]
    decision, doc = run("prefix-mean", grid(*m), [1, 1], layer=1, threshold=0.99)
    assert not decision.fired
    # the head reads the mean of the two log-probability vectors: a normalised geometric mean
    P = grid(*m)[:, 1]
    want = np.sqrt(P[0] * P[1])
    np.testing.assert_allclose(decision.probabilities, want / want.sum(), rtol=1e-5)


def test_unknown_policy_and_bad_parameters_are_bundle_errors():
    from edge2dexit.errors import BundleError

    heads = {"sentence": identity_heads("sentence", 4)}
    with pytest.raises(BundleError, match="unknown policy"):
        make_policy("fastest", heads, 4, {})
    with pytest.raises(BundleError, match="bad parameters"):
        make_policy("sentence-vote", heads, 4, {"tau": 1})
    with pytest.raises(BundleError, match="prefix"):
        make_policy("prefix-mean", heads, 4, {"layer": 1, "threshold": 0.5})
    with pytest.raises(BundleError, match="outside 0..3"):
        make_policy("prefix-mean", all_heads(4), 4, {"layer": 4, "threshold": 0.5})
    with pytest.raises(BundleError, match="bad parameters for the layer policy"):
        make_policy("layer", heads, 4, {"layer": 1, "threshold": 0.5})


@pytest.mark.parametrize("name, params", [
    ("full", {}),
    ("layer", {"layer": 2, "pooling": "prefix"}),
    ("sentence-vote", {"tau_ignore": 0.3, "tau_acc": 1.0}),
    ("paper2d", {"tau_ignore": 0.2, "tau_acc": 1.0}),
    ("paper2d", {"tau_ignore": 0.9, "tau_acc": 5.0}),  # never fires: the fallback deepens everything
    ("prefix-mean", {"layer": 1, "threshold": 0.8, "min_sentences": 2}),
])
def test_every_policy_reads_only_valid_kv_and_decides_as_in_replay(name, params):
    """The same policy through the fake executor, which checks every decode starts where the cache ends over KV
    valid to its depth, decides and costs exactly as replayed."""
    assert name in policy_names()
    rng = np.random.default_rng(7)
    m = rng.uniform(-1, 1, size=(5, 6))
    tokens = [3, 1, 4, 1, 5]
    P = grid(*m)
    replayed, replay_doc = run(name, P, tokens, **params)
    fake = FakeExecutor(states=np.log(P).astype(np.float32))
    doc = Document(4, 100, seq=1)
    policy = make_policy(name, all_heads(6), 6, params)
    decision = fake.run(policy.read(doc, [list(range(n)) for n in tokens]))
    np.testing.assert_array_equal(decision.probabilities, replayed.probabilities)
    assert (decision.exit_sentence, decision.exit_layer, decision.sentences_read, decision.fired) == (
        replayed.exit_sentence, replayed.exit_layer, replayed.sentences_read, replayed.fired)
    assert (doc.valid_depths, doc.token_layers, doc.operations) == (
        replay_doc.valid_depths, replay_doc.token_layers, replay_doc.operations)
    assert doc.token_layers <= fake.token_layers()  # stops inside the graph only ever save


def test_policies_pull_sentences_only_as_far_as_they_read():
    m = np.zeros((4, 6))
    m[:, 3] = 0.95
    pulled = []

    def lazily():
        for n in (2, 2, 2, 2):
            pulled.append(n)
            yield list(range(n))

    policy = make_policy("prefix-mean", all_heads(6), 6, {"layer": 3, "threshold": 0.9, "min_sentences": 2})
    decision = FakeExecutor(states=np.log(grid(*m)).astype(np.float32)).run(policy.read(Document(0, 100), lazily()))
    assert decision.fired and decision.sentences_read == 2 and len(pulled) == 2


def test_boundary_gap_is_the_closest_call_of_the_decision():
    """prefix-mean compares each prefix's margin with τ once it may stop: the gap is the nearest of those, or of the
    answer to a tie; the paper's accumulator counts cells against τ_ignore and totals against τ_acc."""
    m = np.zeros((3, 4))
    m[:, 2] = [0.5, 0.75, 0.99]  # prefix means of these margins: ~0.5, ~0.63, ~0.75...
    decision, _ = run("prefix-mean", grid(*m), [1, 1, 1], layer=2, threshold=0.6, min_sentences=2)
    margins = [float(np.diff(np.exp(np.log(grid(*m)[:k, 2]).mean(0)) / np.exp(np.log(grid(*m)[:k, 2]).mean(0)).sum())[0])
               for k in (2,)]
    assert decision.fired and decision.exit_sentence == 1
    assert decision.boundary_gap == pytest.approx(abs(margins[0] - 0.6))
    votes = Accumulator(2, tau_ignore=0.3, tau_acc=1.0)
    votes.add(np.array([0.4, 0.6]))  # margin 0.2: 0.1 from τ_ignore, not counted
    votes.add(np.array([0.05, 0.95]))  # margin 0.9: counted, total 0.9 is 0.1 from τ_acc
    assert votes.gap == pytest.approx(0.1)


def test_a_policy_registered_in_one_place_is_everywhere(monkeypatch, tmp_path):
    """One class declares a policy's name, heads and calibration grid: make_policy, calibration and the CLI's
    choices all see it."""
    from typer.testing import CliRunner

    from edge2dexit import policies
    from edge2dexit.cli import app
    from edge2dexit.convert.calibrate import Fold, HeldOut, calibrate
    from edge2dexit.policies import Decision, Policy, calibration_grid, register

    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))

    @register
    class FirstSentence(Policy):
        name = "first-sentence"

        def __init__(self, heads, n_layer, layer):
            self.heads, self.layer = heads[self.pooling], layer

        @classmethod
        def grid(cls, n_layer, layers):
            return [{"layer": layer} for layer in layers["sentence"]]

        def read(self, doc, sentences, words=None):
            (state,) = yield from doc.append([next(iter(sentences))], self.layer + 1, layers=[self.layer])
            p = self.heads.proba(self.layer, state.at(self.layer), 1, words)
            return Decision(p, 0, self.layer, 1, fired=True, boundary_gap=float(abs(p[1] - p[0])))

    assert "first-sentence" in policy_names()
    decision, _ = run("first-sentence", grid([0.5, -0.5, 0.9]), [2, 2], layer=1)
    assert decision.label_index == 0 and decision.exit_layer == 1
    assert calibration_grid("first-sentence", 3, {"sentence": [0, 2]}) == [{"layer": 0}, {"layer": 2}]
    documents = [np.log(grid([0.5, -0.5, 0.9])), np.log(grid([-0.5, 0.5, -0.9]))]
    store = write_store(tmp_path / "store", documents, [1, 0], [2, 2])
    held = HeldOut([Fold(store.select(), all_heads(3), None)])
    assert set(calibrate(held, ["first-sentence"], 0.5).chosen) == {"first-sentence"}
    result = CliRunner().invoke(app, ["classify", "-", "--policy", "first-sentence", "--n-ctx", "8"])
    assert "is not one of" not in result.output  # the name passed the CLI's check; the too small context did not
    assert result.exit_code == 2 and "--n-ctx" in result.output
