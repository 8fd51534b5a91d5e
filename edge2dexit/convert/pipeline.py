"""`edge2dexit convert`: labelled text + a base model → a bundle.

data → deterministic train / calibration / test splits → [with `finetune`: a LoRA adapter trained on train,
lora.gguf] → features through the runtime engine (full depth, every layer, each text in one decode, through the
adapter if any) → one exit head per layer and head set (sentence, prefix) trained on train → every policy
calibrated on calibration → every policy measured on test, beside TF-IDF + logistic regression trained on the same
documents → exits.gguf + model card.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..baselines import TFIDF_NAME, tfidf_logreg
from ..bundle import LORA_FILE, MODEL_CARD, MODEL_FILE, BaseModelRef, Bundle, LoraRef, write_bundle
from ..cache import sha256_file
from ..engine import Engine
from ..files import write_text
from ..errors import InputError
from ..heads import ExitHeads, Pooling
from ..lexical import LexicalHead, fit_lexical
from ..llama import quantize
from ..models.registry import identify, resolve_model
from ..sentences import Splitter
from ..stats import wilson_interval
from ..trust import ALONE, BEHIND_WORDS, Trust
from . import lora
from .answers import Answers, measure
from .calibrate import TRUST_PROCEDURE, Calibration, Fold, HeldOut, Point, calibrate, calibrate_trust, fit_scales, \
    layer_accuracies, rescore
from .card import LEXICAL_ROW, TFIDF_ROW, figure, model_card, speedup
from .data import Splits, make_splits
from .features import FeatureStore, extract, stores_under
from .hf import hf_to_gguf, is_hf_checkpoint
from .settings import DEFAULT_PROMPT, SENTIMENT_PROMPT, ConvertSettings
from .train import split_documents, train_heads



@dataclass
class ConvertReport:
    bundle: Path
    splits: str
    method: str  # how the heads were trained and read the calibration documents (Exits.describe)
    choose_docs: int  # calibration documents that fitted the scales and chose every point
    certify_docs: int  # calibration documents that certified the trust
    calibration: Calibration
    test: dict[str, Point]  # each policy as chosen, behind the lexical exit where it has a threshold
    test_without_lexical: dict[str, Point]  # each policy with no lexical exit, at its parameters for that
    test_docs: int
    cross_validated: bool  # no test split: the figures are the certifying half's out-of-fold reads
    test_layer_accuracy: dict[str, list[float]]
    tfidf_accuracy: float | None  # TF-IDF + logistic regression trained as the heads were, on the test split
    lexical_accuracy: float | None  # the bundle's lexical head alone on the test split
    trust: dict[str, Trust]  # the default policy's abstention and prediction sets, per way of reading
    answers: dict[str, Answers]  # the default policy's answers on the test split, per way of reading
    seconds: dict[str, float]
    lora: lora.LoraReport | None = None

    def interval(self, accuracy: float) -> tuple[float, float]:
        """95% interval of a test accuracy."""
        return wilson_interval(round(accuracy * self.test_docs), self.test_docs)

    def summary(self) -> str:
        lines = [self.splits, "", f"{'policy':13} {'test acc':>9} {'95% interval':>14} {'loss bound':>11} "
                                  f"{'token-layers':>13} {'operations':>11} {'lexical':>8}  parameters"]
        for name, p in self.test.items():
            low, high = self.interval(p.accuracy)
            lines.append(f"{name:13} {p.accuracy:9.3f}   {low:.3f}–{high:.3f} {self.calibration.loss_bound[name]:11.3f} "
                         f"{speedup(p.cost):>13} {speedup(p.operations):>11} {p.lexical_share:8.1%}  {p.params}"
                         + (f", words at ≥ {p.lexical_threshold}" if p.lexical_threshold is not None else ""))
        if self.cross_validated:
            lines.append("(no test split: every figure is cross-validated, from the out-of-fold reads of the "
                         "calibration documents that certified the trust)")
        for name, accuracy in ((TFIDF_NAME, self.tfidf_accuracy), ("lexical head", self.lexical_accuracy)):
            if accuracy is not None:
                low, high = self.interval(accuracy)
                lines.append(f"{name:13} {accuracy:9.3f}   {low:.3f}–{high:.3f}  "
                             f"({TFIDF_ROW if name == TFIDF_NAME else LEXICAL_ROW})")
        lines.append(f"(speed-ups against full depth; lexical: share answered by the words alone; loss bound: on "
                     f"calibration, against the reference; {self.calibration.describe_target()})")
        for reading, answers in self.answers.items():
            promises = ", ".join(f"--max-error {row['error_rate']:g}: " + (
                "cannot promise" if row["margin"] is None else
                f"answers {row['coverage']:.0%}, error {figure(row['error'])}") for row in answers.abstention)
            lines.append(f"the default read {reading}: test accuracy {answers.accuracy:.3f}, ECE {answers.ece:.3f} "
                         f"(as the heads computed it: {answers.ece_raw:.3f}); {promises}")
        if self.lora is not None:
            lines.append(self.lora.describe())
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)




def convert(settings: ConvertSettings) -> ConvertReport:
    """The whole conversion: the base model as the bundle will read it, the data's splits, then `build`."""
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, registry_name = _base_model(settings, out)
    splits = make_splits(settings.data)
    return build(settings, splits, model_path, registry_name, {"data": time.perf_counter() - started})


def _base_model(settings: ConvertSettings, out: Path) -> tuple[Path, str]:
    """The GGUF file the bundle is read with, and its registry name ("" for a file that ships in the bundle)."""
    if is_hf_checkpoint(settings.model):  # converted to f16, then re-quantized into the bundle if asked
        source = hf_to_gguf(settings.model, out / (MODEL_FILE if settings.quant == "keep" else "model-f16.gguf"))
    else:
        source = resolve_model(settings.model)
    model_path, registry_name = source, identify(source) or ""
    if settings.quant != "keep":
        model_path = out / MODEL_FILE
        quantize(source, model_path, settings.quant, settings.engine.n_threads)
        registry_name = ""
        if source.parent == out:  # the f16 conversion was only a step
            source.unlink()
    elif not registry_name:
        model_path = out / MODEL_FILE
        if source.resolve() != model_path.resolve():
            shutil.copyfile(source, model_path)
    return model_path, registry_name


def build(settings: ConvertSettings, splits: Splits, model_path: Path, registry_name: str,
          timings: dict[str, float] | None = None) -> ConvertReport:
    """Train, calibrate and write a bundle from `splits`, read through `model_path`: [a LoRA adapter] → features
    through the runtime engine → exit heads and the lexical head → every policy calibrated behind the lexical exit →
    the default policy's abstention and prediction sets → every figure on the test split → exits.gguf + model card."""
    timings = dict(timings or {})
    started = time.perf_counter() - sum(timings.values())

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(settings.work or out / "features")
    splitter = settings.data.make_splitter()
    prompt = settings.prompt or (SENTIMENT_PROMPT if settings.data.data == "imdb" else DEFAULT_PROMPT)

    lora_path, lora_report = None, None
    if settings.finetune is not None:
        lora_path, lora_report = _finetune(settings, model_path, prompt, splitter, splits, out / LORA_FILE,
                                           work / "lora")
        lap("lora")

    stores: dict[str, FeatureStore] = {}
    earlier = stores_under(settings.reuse)
    with Engine.load(model_path, settings.engine, prompt=prompt, lora=lora_path) as engine:
        base = BaseModelRef(registry_name, sha256_file(model_path), engine.architecture, engine.n_layer, engine.n_embd)
        for part in ("train", "calibration", "test"):
            ds = getattr(splits, part)
            if len(ds):
                stores[part] = extract(engine, ds.texts, ds.labels, splitter, work / part, settings.max_sentences,
                                       reuse=earlier)
    lap("features")

    exits = fit_exits(settings, splits, stores)
    lap("training")
    return calibrate_and_write(settings, splits, base, exits, prompt, splitter, lora_path, lora_report, timings)


def calibrate_and_write(settings: ConvertSettings, splits: Splits, base: BaseModelRef, exits: Exits, prompt: str,
                        splitter: Splitter, lora_path: Path | None = None, lora_report: lora.LoraReport | None = None,
                        timings: dict[str, float] | None = None) -> ConvertReport:
    """The trained `exits` calibrated (scales, every policy's point, the trust), measured on the test split, and
    written with the model card."""
    timings = dict(timings or {})
    started = time.perf_counter() - sum(timings.values())
    out = Path(settings.out)

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    # one half of the held-out reads fits the scales and chooses every point; the other certifies the trust
    choose_docs, certify_docs = split_documents(exits.held.labels, 0.5, settings.data.seed)
    scales = fit_scales(exits.held.select(choose_docs), settings.fuse)
    choose, certify = (exits.held.select(docs).calibrated(scales) for docs in (choose_docs, certify_docs))
    calibration = calibrate(choose, None, settings.tolerance, settings.confidence)
    meets = [n for n in calibration.chosen if calibration.meets_target(n)]
    default = min(meets, key=lambda n: calibration.chosen[n].cost) if meets else \
        min(calibration.chosen, key=lambda n: (calibration.loss_bound[n], calibration.chosen[n].cost))
    chosen = calibration.chosen[default]
    readings = {BEHIND_WORDS: chosen, ALONE: calibration.llm_only[default]} if chosen.behind_words else {ALONE: chosen}
    trust = {reading: calibrate_trust(choose, certify, point, settings.confidence) for reading, point in readings.items()}
    # the figures: on the test split, read by the shipped heads; without one, on the certifying half (cross-validated)
    raw_test = exits.test if exits.test is not None else exits.held.select(certify_docs)
    test = raw_test.calibrated(scales)
    on_test = {name: rescore(test, p) for name, p in calibration.chosen.items()}
    without = {name: rescore(test, p) for name, p in (calibration.llm_only or calibration.chosen).items()}
    answers = {reading: measure(test, raw_test.words if point.behind_words else None, point, trust[reading])
               for reading, point in readings.items()}
    layer_acc = {k: v.round(4).tolist() for k, v in layer_accuracies(test).items()}
    lap("calibration")
    tfidf_accuracy, lexical_accuracy = None, None
    if exits.test is not None:
        tfidf = tfidf_logreg().fit(*exits.training_texts)
        tfidf_accuracy = float(np.mean(tfidf.predict(list(splits.test.texts)) == np.asarray(splits.test.labels)))
        if exits.lexical is not None:
            lexical_accuracy = float(np.mean(exits.test.words.argmax(1) == exits.test.labels))
    lap("baseline")

    bundle = Bundle(
        base=base,
        labels=tuple(splits.train.label_names),
        task_prompt=prompt,
        splitter=splitter,
        heads=exits.heads,
        scales=scales,
        policies={name: _plain(point.params) for name, point in calibration.chosen.items()},
        default_policy=default,
        calibration=_plain({**calibration.to_json(), "data": asdict(settings.data),
                            "trust_procedure": TRUST_PROCEDURE}),
        head_kind=settings.head.kind,
        head_hidden=settings.head.hidden if settings.head.kind == "mlp" else 0,
        lora=LoraRef(lora_path.name, sha256_file(lora_path)) if lora_path else None,
        lexical=exits.lexical,
        lexical_thresholds={name: p.lexical_threshold for name, p in calibration.chosen.items()}
        if exits.lexical is not None else {},
        llm_only_policies={name: _plain(p.params) for name, p in calibration.llm_only.items()},
        trust={reading: Trust(t.policy, _plain(t.params), t.confidence, t.n_docs, t.tests)
               for reading, t in trust.items()},
    )
    write_bundle(bundle, out)
    report = ConvertReport(out, splits.describe(), exits.describe(), len(choose_docs), len(certify_docs),
                           calibration, on_test, without, test.n_docs, exits.test is None, layer_acc, tfidf_accuracy,
                           lexical_accuracy, bundle.trust, answers, timings, lora_report)
    write_text(out / MODEL_CARD, model_card(settings, bundle, report))
    return report


@dataclass
class Exits:
    """The trained exits and their reads of documents they were not trained on."""

    heads: dict[str, ExitHeads]  # what the bundle ships
    lexical: LexicalHead | None
    held: HeldOut  # the non-test documents, each read by heads not trained on it (calibration's documents)
    test: HeldOut | None  # the test split read by the shipped heads (None: no test split)
    training_texts: tuple[list[str], list[int]]  # what the shipped heads were trained on, for the baselines
    folds: int

    def describe(self) -> str:
        n = self.held.n_docs
        if self.folds > 1:
            return (f"cross-fitted: the heads and the lexical exit were trained {self.folds} times, each time on "
                    f"{self.folds - 1} of {self.folds} folds of the {n} training and calibration documents, and every "
                    "one of these documents was read by the heads that had not seen it (its out-of-fold read); the "
                    "heads shipped were then trained on all of them")
        return f"fixed splits: the heads were trained on the training split and read the {n} calibration documents"


def fit_exits(settings: ConvertSettings, splits: Splits, stores: dict[str, FeatureStore]) -> Exits:
    """Train the heads and the lexical exit, and read every non-test document by heads that did not see it: with
    `settings.folds` > 1, K-fold cross-fitting over the training and calibration splits together (every label both
    trains and calibrates; the shipped heads are refit on all of them: the fold heads, each on (K − 1)/K of the
    documents, are what their out-of-fold reads measure, and the refit differs from them only by seeing the rest);
    with 1, the heads trained on the training split read the calibration split."""
    labels = splits.train.label_names
    pooled = settings.folds > 1
    if not pooled and "calibration" not in stores:
        raise InputError("without cross-fitting (--folds 1) a calibration split is needed: give it a fraction")
    parts = [part for part in (("train", "calibration") if pooled else ("train",)) if part in stores]
    documents = sum((stores[part].select() for part in parts[1:]), stores[parts[0]].select())
    texts = [t for part in parts for t in getattr(splits, part).texts]
    targets = [y for part in parts for y in getattr(splits, part).labels]

    def trained(docs: np.ndarray) -> tuple[dict[str, ExitHeads], LexicalHead | None]:
        heads = {pooling: train_heads(documents.select(docs), labels, pooling, settings.head)[0]
                 for pooling in Pooling.ALL}
        lexical = fit_lexical([texts[i] for i in docs], [targets[i] for i in docs], len(labels),
                              seed=settings.head.seed) if settings.lexical else None
        return heads, lexical

    def words(lexical: LexicalHead | None, part_texts: list[str]) -> np.ndarray | None:
        return None if lexical is None else np.stack([lexical.proba(t) for t in part_texts])

    everything = np.arange(documents.n_docs)
    heads, lexical = trained(everything)
    if pooled:
        fold_of = fold_assignment(documents.labels, settings.folds, settings.data.seed)
        folds = []
        for k in range(settings.folds):
            fold_heads, fold_lexical = trained(everything[fold_of != k])
            held = everything[fold_of == k]
            folds.append(Fold(documents.select(held), fold_heads, words(fold_lexical, [texts[i] for i in held])))
        held_out = HeldOut(folds)
    else:
        held_out = HeldOut([Fold(stores["calibration"].select(), heads, words(lexical, splits.calibration.texts))])
    test = HeldOut([Fold(stores["test"].select(), heads, words(lexical, splits.test.texts))]) \
        if "test" in stores else None
    return Exits(heads, lexical, held_out, test, (texts, targets), settings.folds)


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold of every document: each class dealt round-robin over the folds in a random order, so that every
    fold holds each class's share."""
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        assignment[members] = np.arange(len(members)) % folds
    return assignment


def _finetune(settings: ConvertSettings, model_path: Path, prompt: str, splitter: Splitter, splits: Splits,
              path: Path, checkpoint: Path) -> tuple[Path, lora.LoraReport]:
    """Train a LoRA adapter on the training split (resuming from `checkpoint` where its last save left off), write it
    to `path`, and check that llama.cpp applies it as torch trained it."""
    train = splits.train
    with Engine.load(model_path, settings.engine, prompt=prompt) as base:
        sentences = [splitter.split(text)[: settings.max_sentences] for text in train.texts]
        docs = lora.tokenized(base, sentences, train.labels)
        model, report = lora.finetune(model_path, docs, len(train.label_names), settings.finetune, settings.head,
                                      settings.engine.n_threads, checkpoint)
        lora.export(model, base.architecture, path)
        report.adapter_cosine = lora.verify(
            model, base, lambda scale: Engine.load(model_path, settings.engine, prompt=prompt, lora=path,
                                                   lora_scale=scale), docs[:2])
    return path, report


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars become Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
