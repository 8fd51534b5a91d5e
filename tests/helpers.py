"""What several test modules share: texts, a tiny convert, synthetic heads and grids, a random LoRA adapter, a GGUF
rewriter, and the rule by which two reads of one text must agree. Fixtures live in conftest.py; test modules
import from here, never from each other."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from edge2dexit.bundle import write_lora
from edge2dexit.convert.data import DataSettings
from edge2dexit.convert.pipeline import convert
from edge2dexit.convert.settings import ConvertSettings, TrainSettings
from edge2dexit.document import replay
from edge2dexit.heads import ExitHead, ExitHeads, Pooling
from edge2dexit.keys import Keys
from edge2dexit.policies import make_policy
from edge2dexit.settings import EngineSettings

TASK_PROMPT = "Classify the sentiment of this movie review.\nReview:"
# How far a class probability may move when the same text is batched differently (docs/llama-cpp.md §5: states
# differ in the last digits, up to ~5% per row). Through the default bundle's layer-14 prefix head, steepest where
# a probability is between 0.3 and 0.7, up to 0.035 was seen on the Ray corpus (0.02 with the earlier bundle's
# layer-19 head); the exit point or, near the stop threshold, the label must still agree.
BATCHING_SCORE_TOLERANCE = 0.05
REVIEW = (
    "I went to see this movie last night with a couple of friends. The acting was wonderful, and the story kept "
    "me hooked from the first scene to the last. However, the ending felt rushed, as if the writers ran out of "
    "ideas. Still, I would recommend it to anyone who enjoys a good thriller. The music was great too. "
    "Overall, a solid film that I will happily watch again."
)

REVIEWS = [
    "A wonderful film. The acting was superb and the story moving. I loved every minute of it.",
    "What a waste of time. The plot made no sense at all. The acting was wooden. The ending dragged on and on. "
    "I wanted my money back. Avoid it.",
    "Great fun from start to end. The music was lovely.",
    "Boring. I fell asleep halfway through.",
    "The cinema was half full. The film runs two hours. It was shown on a Tuesday. The cast is large. "
    "The sets were colourful. I smiled a lot, and I would gladly see it again with my family.",
]
TEXT = "The film runs two hours. I loved every minute of it. The acting was superb. A wonderful, moving story."


# --- two reads of one text ------------------------------------------------------------------------------------

# A margin (p_top1 − p_top2) moves up to twice as far as one probability.
BOUNDARY_TOLERANCE = 2 * BATCHING_SCORE_TOLERANCE
DECISION = ("label", "exit_sentence", "exit_layer", "sentences_read")


def _field(result: Any, name: str) -> Any:
    return result[name] if isinstance(result, dict) else getattr(result, name)


def _scores(result: Any) -> dict[str, float]:
    if isinstance(result, dict):  # a result row (Ray): score_<label> columns
        return {k.removeprefix("score_"): v for k, v in result.items() if k.startswith("score_")}
    return result.scores


def near_boundary(*results: Any) -> bool:
    """Whether any of these reads decided within the batching tolerance of a boundary: a stop threshold, an
    accumulation threshold, or a tie between the top two classes (`Result.boundary_gap`)."""
    return min(_field(r, "boundary_gap") for r in results) < BOUNDARY_TOLERANCE


def assert_same_decision(got: Any, want: Any, context: Any = "") -> None:
    """What the engine promises of one text read two ways (batched and alone, grouped into other decodes, another
    backend): its states move by llama.cpp's batching noise only (docs/llama-cpp.md §5), so the label, exit
    sentence and layer and the sentences read are the same and every score is within BATCHING_SCORE_TOLERANCE —
    unless either read decided within that noise of a boundary, where it may go either way."""
    if near_boundary(got, want):
        return
    assert tuple(_field(got, k) for k in DECISION) == tuple(_field(want, k) for k in DECISION), context
    for label, score in _scores(want).items():
        assert _scores(got)[label] == pytest.approx(score, abs=BATCHING_SCORE_TOLERANCE), (context, label)


# --- a tiny convert -------------------------------------------------------------------------------------------

GOOD = ["I loved every minute of it.", "The acting was superb.", "A wonderful, moving story.", "Great fun from start to end."]
BAD = ["I hated every minute of it.", "The acting was dreadful.", "A boring, pointless story.", "A waste of time and money."]
NEUTRAL = ["The film runs two hours.", "It was shown on a Tuesday.", "The cinema was half full."]


def synthetic_reviews(path, n_per_class=12, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for label, pool in (("pos", GOOD), ("neg", BAD)):
            for _ in range(n_per_class):
                sentences = rng.sample(NEUTRAL, 1) + rng.sample(pool, 2)
                w.writerow([" ".join(sentences), label])


def tiny_convert(root, model, **settings):
    """Convert two dozen synthetic reviews under `root` (a few seconds; `settings` adds to the ConvertSettings)."""
    data = root / "reviews.csv"
    synthetic_reviews(data)
    # The split and learning rate this test was written with (the defaults became 0.5/0.25/0.25 and 3e-4, which on
    # a dozen documents leaves the heads barely trained).
    return convert(ConvertSettings(
        model=model,
        data=DataSettings(str(data), text_column="review", label_column="sentiment", per_class=None,
                          fractions=(0.6, 0.2, 0.2), splitter="regex"),
        out=root / "bundle",
        head=TrainSettings(kind="linear", epochs=30, seed=0, lr=1e-3), tolerance=0.05,
        engine=EngineSettings(n_ctx=512),
        **settings,
    ))


# --- synthetic heads and probability grids (policies read log-probabilities through identity heads) ------------

C = 2


def identity_heads(pooling: str, n_layer: int) -> ExitHeads:
    eye = np.eye(C, dtype=np.float32)
    zeros, ones = np.zeros(C, np.float32), np.ones(C, np.float32)
    return ExitHeads(
        pooling, ("neg", "pos"), {l: ExitHead(l, "linear", zeros, ones, ((eye, zeros),)) for l in range(n_layer)}
    )


def grid(*margins_by_sentence):
    """P[k, l] from margins: positive margin m → class 1 with p = (1 + m) / 2, negative → class 0."""
    m = np.array(margins_by_sentence, dtype=np.float64)
    p1 = (1 + m) / 2
    return np.stack([1 - p1, p1], axis=-1)


def all_heads(n_layer):
    return {Pooling.SENTENCE: identity_heads(Pooling.SENTENCE, n_layer),
            Pooling.PREFIX: identity_heads(Pooling.PREFIX, n_layer)}


def run(name, P, tokens, min_decode_tokens=1, **params):
    """Replay policy `name` over the states log(P) of sentences of `tokens[k]` tokens, reading ahead to
    `min_decode_tokens` tokens a decode: (decision, document)."""
    n_layer = P.shape[1]
    policy = make_policy(name, all_heads(n_layer), n_layer, params)
    sentences = [range(n) for n in tokens]  # stand-ins of the right lengths
    return replay(lambda doc: policy.read(doc, sentences), np.log(P).astype(np.float32), tokens, min_decode_tokens)


# --- files ----------------------------------------------------------------------------------------------------


def write_store(directory, documents, labels, tokens):
    """A feature store of `documents` (each [sentences, n_layer, n_embd] states) with their labels and tokens per
    sentence, as `convert.features.extract` leaves one."""
    from edge2dexit.convert.features import open_store

    directory.mkdir(parents=True, exist_ok=True)
    states = np.concatenate(documents).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    meta = {"offsets": offsets.tolist(), "labels": list(labels), "n_layer": states.shape[1],
            "n_embd": states.shape[2], "done": len(documents)}
    (directory / "meta.json").write_text(json.dumps(meta))
    states.tofile(directory / "states.f16")
    np.save(directory / "tokens.npy", np.array(tokens, dtype=np.int32))
    return open_store(directory)


def random_lora(model_file: str | Path, path: Path, rank: int = 4, std: float = 0.05, seed: int = 0,
                targets: tuple[str, ...] = ("attn_q", "attn_v"), zero: bool = False) -> Path:
    """A LoRA adapter file on `targets` of every layer of `model_file`, with random A and random (or zero) B."""
    rng = np.random.default_rng(seed)
    reader = GGUFReader(model_file)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (in, out)
    pairs = {}
    for name, shape in shapes.items():
        if name.split(".")[-2] in targets:
            n_in, n_out = shape
            b = np.zeros((n_out, rank)) if zero else rng.normal(0, std, (n_out, rank))
            pairs[name] = (rng.normal(0, std, (rank, n_in)), b)
    return write_lora(path, reader.get_field("general.architecture").contents(), pairs, alpha=2.0 * rank)


def rewrite(src, dst, set_keys=(), drop=(), tensors=None):
    """Copy an exits file with GGUFWriter, replacing keys ({key: (value, type, item type)}), dropping keys or
    tensors (names in `drop`), or replacing all tensors ({name: array})."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch=reader.fields[Keys.General.ARCHITECTURE.name].contents())
    set_keys = {getattr(k, "name", k): v for k, v in dict(set_keys).items()}
    drop = [getattr(k, "name", k) for k in drop]
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == Keys.General.ARCHITECTURE.name or name in drop:
            continue
        value, vtype, sub = set_keys.pop(name, (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None))
        writer.add_key_value(name, value, vtype, sub)
    for name, (value, vtype, sub) in set_keys.items():
        writer.add_key_value(name, value, vtype, sub)
    if tensors is None:
        tensors = {t.name: np.array(t.data) for t in reader.tensors if t.name not in drop}
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
