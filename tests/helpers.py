"""What several test modules share: texts, the command line run as a user runs it, a tiny convert, synthetic heads
and grids, a random LoRA adapter, a GGUF rewriter, and the rule by which two reads of one text must agree. Fixtures
live in conftest.py; test modules import from here, never from each other."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from edge2dexit.bundle import BaseModelRef, Bundle, write_lora
from edge2dexit.calibrated import CalibratedHeads, Scales
from edge2dexit.convert.data import DataSettings
from edge2dexit.convert.pipeline import convert
from edge2dexit.convert.settings import ConvertSettings, TrainSettings
from edge2dexit.document import replay
from edge2dexit.heads import ExitHead, ExitHeads, Pooling
from edge2dexit.keys import Keys
from edge2dexit.policies import make_policy
from edge2dexit.sentences import Splitter
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
# Decides early with the default bundle: a dozen short, plainly positive sentences (read to its end only if the
# policy never becomes confident).
EARLY = ("What a film. I loved it. The acting is superb. The story is moving. The music is lovely. Every scene is "
         "beautiful. The cast is perfect. I laughed and cried. It is a masterpiece. I will watch it again. "
         "Everyone should see it. Wonderful from start to end.")


def mixed_reviews(n: int, seed: int = 0) -> list[str]:
    """`n` short reviews of two to four sentences, positive, negative and mixed, from the sentences of REVIEWS and
    the tiny convert's pools: many distinct texts that each read quickly."""
    rng = random.Random(seed)
    pool = sorted({s.strip() + "." for r in REVIEWS for s in r.split(".") if s.strip()} | {*GOOD, *BAD, *NEUTRAL})
    return [" ".join(rng.sample(pool, rng.randint(2, 4))) for _ in range(n)]


# --- the command line, run as a user runs it ----------------------------------------------------------------------

# The installed entry point, beside this interpreter (what `pip install` puts on PATH).
CLI = Path(sys.executable).parent / "edge2dexit"
README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args: object, input: str | bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `edge2dexit ARGS` in a subprocess (with this test's environment: its EDGE2DEXIT_HOME); stdout and stderr
    as text."""
    done = subprocess.run([str(CLI), *map(str, args)], capture_output=True, timeout=timeout,
                          input=input.encode() if isinstance(input, str) else input)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def bash(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a bash script (pipes, process substitution) with this test's environment; `$E` is the entry point."""
    return subprocess.run(["bash", "-c", f"E={CLI}\n{script}"], capture_output=True, text=True, timeout=timeout)


def json_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_exit(done: subprocess.CompletedProcess, code: int, *words: str, one_line: bool = True) -> None:
    """The CLI's promise for a failure a user can act on: its documented exit code, no traceback, and (unless it is
    a usage error, which typer frames in a box) one line on stderr holding `words`."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    if one_line:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("edge2dexit: "), done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def documented_exit_codes() -> dict[int, str]:
    """The exit-code table of README's Reliability section: code -> meaning."""
    section = README.read_text(encoding="utf-8").split("## Reliability", 1)[1]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE)}


# --- a fresh interpreter ---------------------------------------------------------------------------------------

def loaded_after(statements: list[str], watched: tuple[str, ...]) -> set[str]:
    """Which of the `watched` modules are in sys.modules after running `statements` in a fresh interpreter."""
    code = "\n".join(["import json, sys", *statements,
                      f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


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


def tiny_convert(root, model, lexical=False, fractions=(0.6, 0.2, 0.2), **settings):
    """Convert two dozen synthetic reviews under `root` (a few seconds; `settings` adds to the ConvertSettings).
    Without a lexical exit unless asked: on these reviews the words alone decide everything, and most tests are
    about what the LLM reads."""
    return convert(tiny_settings(root, model, lexical, fractions, **settings))


def tiny_settings(root, model, lexical=False, fractions=(0.6, 0.2, 0.2), **settings) -> ConvertSettings:
    """What `tiny_convert` converts with, its reviews written under `root`."""
    data = root / "reviews.csv"
    synthetic_reviews(data)
    # The split and learning rate this test was written with (the defaults became 0.5/0.25/0.25 and 3e-4, which on
    # a dozen documents leaves the heads barely trained).
    return ConvertSettings(
        model=model,
        data=DataSettings(str(data), text_column="review", label_column="sentiment", per_class=None,
                          fractions=fractions, splitter="regex"),
        out=root / "bundle",
        head=TrainSettings(kind="linear", epochs=30, seed=0, lr=1e-3), tolerance=0.05,
        engine=EngineSettings(n_ctx=512),
        lexical=lexical,
        **settings,
    )


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
    """Identity heads of both poolings with scales that change nothing (alone and behind the words)."""
    heads = {pooling: identity_heads(pooling, n_layer) for pooling in (Pooling.SENTENCE, Pooling.PREFIX)}
    scales = Scales.identity(heads, lexical=True)
    return {pooling: CalibratedHeads(h, scales.exits[pooling]) for pooling, h in heads.items()}


def run(name, P, tokens, min_decode_tokens=1, **params):
    """Replay policy `name` over the states log(P) of sentences of `tokens[k]` tokens, reading ahead to
    `min_decode_tokens` tokens a decode: (decision, document)."""
    n_layer = P.shape[1]
    policy = make_policy(name, all_heads(n_layer), n_layer, params)
    sentences = [range(n) for n in tokens]  # stand-ins of the right lengths
    return replay(lambda doc: policy.read(doc, sentences), np.log(P).astype(np.float32), tokens, min_decode_tokens)


# --- bundles made in code (no LLM) ------------------------------------------------------------------------------

SHA = "a5fd3b62" + "0" * 56
D = 16


def make_heads(rng, pooling, labels, layers, kind):
    sizes = [D, 8, len(labels)] if kind == "mlp" else [D, len(labels)]
    return ExitHeads(pooling, labels, {
        layer: ExitHead(
            layer, kind,
            (rng.normal(size=D) * 100).astype(np.float32), rng.uniform(1, 50, size=D).astype(np.float32),
            tuple((rng.normal(size=(o, i)).astype(np.float32), rng.normal(size=o).astype(np.float32))
                  for i, o in zip(sizes, sizes[1:])))
        for layer in layers})


def make_bundle(kind="mlp", labels=("neg", "pos")):
    rng = np.random.default_rng(0)
    heads = {"sentence": make_heads(rng, "sentence", labels, [1, 3, 5], kind),
             "prefix": make_heads(rng, "prefix", labels, [2, 4], kind)}
    return Bundle(
        base=BaseModelRef("smollm2-135m", SHA, "llama", 6, D),
        labels=labels,
        task_prompt="Classify the sentiment of this review:",
        splitter=Splitter("regex", "en"),
        heads=heads,
        scales=Scales.identity(heads, lexical=False),
        policies={"prefix-mean": {"layer": 4, "threshold": 0.25, "min_sentences": 3}, "full": {}},
        default_policy="prefix-mean",
        calibration={"frontier": [[0.91, 2.5], [0.9, 3.1]], "chosen": 1},
        head_kind=kind,
        head_hidden=8 if kind == "mlp" else 0,
    )


GOOD_WORDS = ("wonderful", "superb", "moving", "brilliant", "Loved", "great", "délicieux", "素晴らしい")
BAD_WORDS = ("dreadful", "boring", "pointless", "awful", "Hated", "waste", "ennuyeux", "退屈")
FILLER = ("the film", "a story", "the cast", "on Tuesday", "<br />", "it was", "l'acteur", "two hours", "a", "I")


def lexical_corpus(n: int, seed: int = 0, n_classes: int = 2) -> tuple[list[str], list[int]]:
    """Short reviews whose words mostly decide their class (class 2, if asked for, is neutral filler), with what a
    real corpus throws at an analyzer: case, accents, other scripts, HTML breaks, CRLF, one-letter words."""
    rng = np.random.default_rng(seed)
    pools = (BAD_WORDS, GOOD_WORDS, FILLER)[:n_classes]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(n_classes))
        words = list(rng.choice(FILLER, 3)) + list(rng.choice(pools[label], 2)) + list(rng.choice(pools[
            int(rng.integers(n_classes))], 1))
        rng.shuffle(words)
        texts.append(" ".join(words[:3]) + ".\r\n" + " ".join(words[3:]).upper() + "!")
        labels.append(label)
    return texts, labels


def with_lexical(bundle, thresholds=None):
    """`bundle` with a lexical head fitted on `lexical_corpus` and its thresholds (default: 0.8 for every policy)."""
    from edge2dexit.lexical import fit_lexical

    texts, labels = lexical_corpus(200, n_classes=len(bundle.labels))
    head = fit_lexical(texts, labels, len(bundle.labels))
    return dataclasses.replace(bundle, lexical=head, scales=Scales.identity(bundle.heads, lexical=True),
                               lexical_thresholds=thresholds or dict.fromkeys(bundle.policies, 0.8))


def without_words(bundle):
    """`bundle` read by the LLM at the parameters calibrated behind its words, with no words before it: each head
    at its scale for reading alone."""
    scales = Scales(None, {pooling: {layer: dataclasses.replace(scale, fused=None) for layer, scale in layers.items()}
                           for pooling, layers in bundle.scales.exits.items()})
    return dataclasses.replace(bundle, lexical=None, lexical_thresholds={}, llm_only_policies={}, trust={},
                               scales=scales)


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
