"""The engine against plain full-depth decodes of the same token stream, on SmolLM2-135M and Gemma-3-270M.

Exactness is bit-for-bit where the same tokens go through the same decode calls (llama.cpp is deterministic
on the CPU for a fixed split into calls). Across a different split (one call for several sentences) llama.cpp
itself differs slightly (docs/llama-cpp.md §5); there we assert a stated tolerance.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from edge2dexit.document import sentence_by_sentence, whole_text
from edge2dexit.engine import Engine, EngineSettings
from edge2dexit.measure.plain import PlainReader
from edge2dexit.errors import ContextOverflowError
from edge2dexit.sentences import Splitter

from helpers import REVIEW, TASK_PROMPT

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def reference(any_engine):
    """States of a plain full-depth read, one sentence per decode, every layer."""
    tokens = [any_engine.tokenize(s) for s in Splitter().split(REVIEW)]
    doc = any_engine.document()
    states = [any_engine.run(doc.append([t], any_engine.n_layer))[0] for t in tokens]
    return tokens, states


def assert_exact(states, reference_states, depth):
    for got, ref in zip(states, reference_states):
        assert got.layers == tuple(range(depth))
        assert got.means.shape == (depth, ref.means.shape[1])
        assert np.array_equal(got.means, ref.means[:depth]), f"sentence {got.index} differs"


def test_depth_limited_states_equal_full_depth(any_engine, reference):
    tokens, ref = reference
    for depth in (1, any_engine.n_layer // 4, any_engine.n_layer // 2, any_engine.n_layer - 1):
        doc = any_engine.document()
        states = [any_engine.run(doc.append([t], depth))[0] for t in tokens]
        assert_exact(states, ref, depth)
        assert doc.token_layers == sum(map(len, tokens)) * depth
        assert doc.operations == len(tokens) * depth


def test_shallow_then_deeper_pass_is_exact(any_engine, reference):
    tokens, ref = reference
    n_layer = any_engine.n_layer
    shallow, deep = n_layer // 4, 3 * n_layer // 4
    doc = any_engine.document()
    for t in tokens[:-1]:
        any_engine.run(doc.append([t], shallow))
    deepened = any_engine.run(doc.deepen(deep))
    assert [s.index for s in deepened] == list(range(len(tokens) - 1))
    assert_exact(deepened, ref, deep)
    assert doc.valid_depths == (deep,) * (len(tokens) - 1)
    # the next sentence at full depth makes the engine deepen again, exactly
    last = any_engine.run(doc.append([tokens[-1]], n_layer))
    assert_exact(last, ref[-1:], n_layer)
    assert doc.valid_depths == (n_layer,) * len(tokens)
    n_tok = sum(map(len, tokens[:-1]))
    assert doc.token_layers == n_tok * (shallow + deep + n_layer) + len(tokens[-1]) * n_layer
    assert doc.operations == len(tokens) * n_layer


def test_stopped_decode_leaves_context_usable(any_engine, reference):
    tokens, ref = reference
    depth = any_engine.n_layer // 3
    doc = any_engine.document()
    first = [any_engine.run(doc.append([t], any_engine.n_layer))[0] for t in tokens[:2]]
    assert_exact(first, ref[:2], any_engine.n_layer)
    rest = [any_engine.run(doc.append([t], depth))[0] for t in tokens[2:]]  # each decode stops after layer depth-1
    assert_exact(rest, ref[2:], depth)
    assert doc.valid_depths == (any_engine.n_layer,) * 2 + (depth,) * (len(tokens) - 2)


def test_selected_layers_only(any_engine, reference):
    tokens, ref = reference
    doc = any_engine.document()
    states = any_engine.run(doc.append([tokens[0]], 6, layers=[1, 5]))[0]
    assert states.layers == (1, 5)
    assert np.array_equal(states.at(5), ref[0].at(5))
    assert np.array_equal(states.at(1), ref[0].at(1))


def test_one_pass_matches_sentence_by_sentence_within_tolerance(any_engine, reference):
    """Several sentences in one decode: llama.cpp's own batching noise (docs/llama-cpp.md §5: cos ≥ 0.9986)."""
    tokens, ref = reference
    doc = any_engine.document()
    states = any_engine.run(doc.append(tokens, any_engine.n_layer))
    assert doc.decode_calls == 1
    for got, want in zip(states, ref):
        cos = (got.means * want.means).sum(1) / np.linalg.norm(got.means, axis=1) / np.linalg.norm(want.means, axis=1)
        assert cos.min() > 0.998


def test_whole_text_is_one_plain_decode_of_the_token_stream(any_engine, reference):
    """What convert stores: bit-identical to appending the whole text in one decode, and within batching noise of
    the runtime's sentence-by-sentence read (measured on 8 IMDB reviews of 325 tokens: cosine ≥ 0.9997)."""
    tokens, ref = reference
    stacked = any_engine.run(whole_text(any_engine.document(), tokens, any_engine.n_layer))
    one_decode = any_engine.run(any_engine.document().append(tokens, any_engine.n_layer))
    np.testing.assert_array_equal(stacked, np.stack([s.means for s in one_decode]))
    by_sentence = np.stack([s.means for s in ref])
    cos = (stacked * by_sentence).sum(-1) / np.linalg.norm(stacked, axis=-1) / np.linalg.norm(by_sentence, axis=-1)
    assert cos.min() > 0.998


def test_callback_exception_is_raised_and_context_stays_usable(any_engine, reference):
    """A stop rule runs inside llama_decode, called from the eval callback: its exception (which ctypes would swallow,
    silently stopping the graph) is raised once the decode returns."""
    tokens, ref = reference

    def broken(layer, means):
        raise ZeroDivisionError("inside the eval callback")

    doc = any_engine.document()
    with pytest.raises(ZeroDivisionError, match="inside the eval callback"):
        any_engine.run(doc.append([tokens[0]], 4, layers=[1], stop=broken))
    doc = any_engine.document()
    assert_exact([any_engine.run(doc.append([tokens[0]], 4))[0]], ref[:1], 4)


def test_text_longer_than_context_is_a_clear_error(smollm2_path):
    with Engine.load(smollm2_path, EngineSettings(n_ctx=64), prompt=TASK_PROMPT) as engine:
        tokens = [engine.tokenize(s) for s in ["This sentence is short."] * 80]
        doc = engine.document()
        assert doc.room == engine.capacity == 64 - len(engine.prompt_tokens)
        assert sum(map(len, tokens)) > doc.room
        with pytest.raises(ContextOverflowError, match="raise the context size"):
            engine.run(doc.append(tokens, 4))
        assert doc.n_sentences == 0
        assert sum(map(len, tokens[:2])) <= doc.room
        engine.run(doc.append(tokens[:2], 4))  # still usable after the refusal
        assert doc.valid_depths == (4, 4)


def test_runtime_never_imports_torch_or_transformers():
    code = (
        "import sys, edge2dexit, edge2dexit.engine, edge2dexit.llama, edge2dexit.cli;"
        "import edge2dexit.classifier, edge2dexit.policies, edge2dexit.bundle, edge2dexit.heads;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stop_rule_ends_the_decode_inside_the_graph(any_engine, reference):
    tokens, ref = reference
    seen = []

    def stop(layer, means):
        seen.append(layer)
        np.testing.assert_array_equal(means[0], ref[0].at(layer))
        return layer == 4

    doc = any_engine.document()
    (states,) = any_engine.run(doc.append([tokens[0]], any_engine.n_layer, stop=stop))
    assert seen == [0, 1, 2, 3, 4]
    assert states.depth == 5 and states.layers == (0, 1, 2, 3, 4)
    assert doc.valid_depths == (5,) and doc.token_layers == len(tokens[0]) * 5
    # the next sentence needs depth 8: the first is re-decoded first, exactly
    (second,) = any_engine.run(doc.append([tokens[1]], 8))
    assert_exact([second], ref[1:2], 8)
    assert doc.valid_depths == (8, 8)


def test_abandoned_deepening_keeps_the_document_exact(any_engine, reference):
    tokens, ref = reference
    doc = any_engine.document()
    for t in tokens[:4]:
        any_engine.run(doc.append([t], 3))
    while (states := any_engine.run(doc.deepen_next(9))) is not None:
        assert_exact([states], ref[states.index : states.index + 1], 9)
        if states.index == 1:
            break  # sentences 2 and 3 are now out of the cache
    assert doc.valid_depths == (9, 9, 0, 0)
    (fifth,) = any_engine.run(doc.append([tokens[4]], 6))  # re-decodes 2 and 3 at 6 first
    assert_exact([fifth], ref[4:5], 6)
    assert doc.valid_depths == (9, 9, 6, 6, 6)


def test_sentence_by_sentence_is_the_reference_read(any_engine, reference):
    tokens, ref = reference
    means = any_engine.run(sentence_by_sentence(any_engine.document(), tokens, any_engine.n_layer))
    assert means.shape == (len(tokens), any_engine.n_layer, any_engine.n_embd)
    for k, want in enumerate(ref):
        assert np.array_equal(means[k], want.means)


def test_documents_own_their_sequence(smollm2_engine):
    engine = smollm2_engine
    tokens = [engine.tokenize("A fine film.")]
    with pytest.raises(ValueError, match="outside 1..1"):
        engine.document(seq=2)
    old = engine.document()
    engine.run(old.append(tokens, 2))
    new = engine.document()  # the same sequence: the old document may no longer read
    with pytest.raises(RuntimeError, match="newer Engine.document"):
        engine.run(old.append(tokens, 2))
    (states,) = engine.run(new.append(tokens, 2))
    engine.release(new)
    with pytest.raises(RuntimeError, match="newer Engine.document"):
        engine.run(new.append(tokens, 2))
    again = engine.document()
    (same,) = engine.run(again.append(tokens, 2))
    assert np.array_equal(same.means, states.means)  # release and a new document start from the prompt alone


def test_plain_reader_leaves_the_engine_exact(smollm2_engine):
    engine = smollm2_engine
    tokens = [engine.tokenize(s) for s in Splitter().split(REVIEW)]
    before = engine.run(sentence_by_sentence(engine.document(), tokens[:2], engine.n_layer, [engine.n_layer - 1]))
    with PlainReader(engine) as plain:
        assert plain.n_prompt == len(engine.prompt_tokens)
        plain.read([t for s in tokens for t in s])
        plain.read(tokens[0])  # each read starts again after the prompt
    after = engine.run(sentence_by_sentence(engine.document(), tokens[:2], engine.n_layer, [engine.n_layer - 1]))
    assert np.array_equal(before, after)


def test_an_engine_without_a_task_prompt(smollm2_path):
    """No prompt: SmolLM2's tokenizer adds no BOS, so the prompt is no tokens at all and there is nothing to decode."""
    with Engine.load(smollm2_path, EngineSettings(n_ctx=256)) as engine:
        assert engine.capacity == 256 - len(engine.prompt_tokens)
        (states,) = engine.run(engine.document().append([engine.tokenize("A fine film.")], 3, layers=[2]))
        assert states.means.shape == (1, engine.n_embd) and np.isfinite(states.means).all()


@pytest.mark.parametrize("name", ["smollm2-135m@q8_0", "gemma3-270m"])
def test_the_c_and_the_python_tap_read_bit_identical_states(model_file, name):
    """The two eval-callback taps copy the same rows from the same graph: every layer read, a stop rule that ends
    the graph, and a depth-limited decode give equal arrays, bit for bit."""
    from edge2dexit.llama import Context, ContextSettings, Model, Span

    with Model(model_file(name)) as model:
        tokens = model.tokenize(REVIEW, add_bos=True)
        decoded = {}
        for tap in ("c", "python"):
            with Context(model, ContextSettings(512, 1, 512, tap=tap)) as context:
                every = context.decode([Span(0, 0, tokens)], model.n_layer, range(model.n_layer))
                context.remove(0)
                seen = []
                stopped = context.decode([Span(0, 0, tokens)], model.n_layer, [2, 5, 9],
                                         on_layer=lambda layer, rows: seen.append((layer, rows.shape)) or layer == 5)
                context.remove(0)
                shallow = context.decode([Span(0, 0, tokens[:40]), Span(0, 40, tokens[40:])], 7, [6])
                decoded[tap] = (every, stopped, shallow, seen)
    for c, python in zip(decoded["c"][:3], decoded["python"][:3]):
        assert c.depth == python.depth and c.rows.keys() == python.rows.keys()
        for layer in c.rows:
            np.testing.assert_array_equal(c.rows[layer], python.rows[layer])
    assert decoded["c"][1].depth == 6 and decoded["c"][3] == decoded["python"][3] == [
        (2, (len(tokens), model.n_embd)), (5, (len(tokens), model.n_embd))]


def test_without_the_c_tap_the_python_tap_is_used_and_says_so_once(monkeypatch):
    from edge2dexit import llama
    from edge2dexit.errors import SettingsError

    monkeypatch.setattr(llama, "_c_tap_module", lambda: None)
    monkeypatch.setattr(llama, "_warned_no_c_tap", False)
    with pytest.warns(RuntimeWarning, match="C eval-callback tap was not built"):
        assert llama.choose_tap(None) == "python"
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert llama.choose_tap(None) == "python"
    assert again == []
    with pytest.raises(SettingsError, match="C tap was not built"):
        llama.choose_tap("c")
