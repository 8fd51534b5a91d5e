"""`edge2dexit convert`: labelled text + a base model → a bundle.

data → deterministic train / calibration / test splits → features through the runtime engine (full depth,
every layer, one decode per sentence) → one exit head per layer and head set (sentence, prefix) trained on
train → every policy calibrated on calibration → every policy measured on test → exits.gguf + model card.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MODEL_CARD, MODEL_FILE, BaseModelRef, Bundle, write_bundle
from ..engine import Engine, EngineSettings
from ..errors import InputError
from ..files import sha256_file
from ..heads import ExitHeads
from ..llama import quantize
from ..models.registry import identify, resolve_model
from ..policies import POLICIES, PREFIX, SENTENCE
from ..sentences import SentenceSplitter
from . import data as datasets
from .calibrate import Calibration, Point, calibrate, layer_accuracies, replay
from .features import FeatureStore, extract
from .hf import hf_to_gguf, is_hf_checkpoint
from .train import TrainSettings, train_heads

DEFAULT_PROMPT = "Classify the following text.\nText:"
SENTIMENT_PROMPT = "Classify the sentiment of this movie review as positive or negative.\nReview:"
# Documents per class drawn before sentences are counted (counting is the slow part of preparing data).
COUNTING_POOL = 1000


@dataclass(frozen=True)
class ConvertSettings:
    model: str  # registry name, GGUF path, or a Hugging Face checkpoint directory
    data: str  # built-in set name (imdb, clothing, tweets) or a CSV / TSV / JSONL file
    out: Path
    text_column: str = "text"
    label_column: str = "label"
    prompt: str | None = None  # default: a sentiment prompt for imdb, a generic one otherwise
    per_class: int | None = 300  # balanced subsample size per class (None: everything)
    min_sentences: int = 0
    max_sentences: int | None = 20  # sentences per document kept for features (bounds the cost)
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    seed: int = 0
    splitter: str = "pysbd"
    language: str = "en"
    head: TrainSettings = field(default_factory=TrainSettings)
    tolerance: float = 0.02
    quant: str = "keep"
    n_ctx: int = 2048
    threads: int | None = None
    work: Path | None = None  # feature stores (default: OUT/features); reused when the inputs match


@dataclass
class ConvertReport:
    bundle: Path
    splits: str
    calibration: Calibration
    test: dict[str, Point]
    test_layer_accuracy: dict[str, list[float]]
    seconds: dict[str, float]

    def summary(self) -> str:
        lines = [self.splits, "", f"{'policy':10} {'test acc':>9} {'token-layers':>13} {'operations':>11}  parameters"]
        for name, p in self.test.items():
            lines.append(f"{name:10} {p.accuracy:9.3f} {1 / p.cost:12.2f}× {1 / p.operations:10.2f}×  {p.params}")
        best = self.calibration.best_layer
        lines.append(f"(speed-ups against full depth; calibration target {self.calibration.target:.3f} = best layer "
                     f"{best['pooling']}@{best['layer']} {self.calibration.best_layer_accuracy:.3f} − {self.calibration.tolerance})")
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def load_data(settings: ConvertSettings) -> datasets.LabelledSet:
    if settings.data in datasets.BUILTIN_SETS:
        return datasets.load_builtin(settings.data)
    return datasets.load_file(settings.data, settings.text_column, settings.label_column)


def make_splits(settings: ConvertSettings, splitter: SentenceSplitter) -> datasets.Splits:
    ds = load_data(settings)
    if settings.per_class is not None:
        pool = min(min(ds.class_counts().values()), max(COUNTING_POOL, settings.per_class))
        ds = datasets.subsample(ds, pool, settings.seed)
    ds = datasets.prepare(ds, splitter, min_sentences=settings.min_sentences)
    if settings.per_class is not None:
        ds = datasets.subsample(ds, min(settings.per_class, min(ds.class_counts().values())), settings.seed)
    splits = datasets.split(ds, *settings.fractions, seed=settings.seed)
    datasets.check_labels_seen(splits.train, splits.calibration)
    datasets.check_labels_seen(splits.train, splits.test)
    return splits


def convert(settings: ConvertSettings) -> ConvertReport:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(settings.work or out / "features")
    splitter = SentenceSplitter(settings.splitter, settings.language)
    prompt = settings.prompt or (SENTIMENT_PROMPT if settings.data == "imdb" else DEFAULT_PROMPT)

    if is_hf_checkpoint(settings.model):  # converted to f16, then re-quantized into the bundle if asked
        source = hf_to_gguf(settings.model, out / (MODEL_FILE if settings.quant == "keep" else "model-f16.gguf"))
    else:
        source = resolve_model(settings.model)
    known = identify(source)
    model_path, registry_name = source, (known.name if known else "")
    if settings.quant != "keep":
        model_path = out / MODEL_FILE
        quantize(source, model_path, settings.quant, settings.threads)
        registry_name = ""
        if source.parent == out:  # the f16 conversion was only a step
            source.unlink()
    elif not registry_name:
        model_path = out / MODEL_FILE
        if source.resolve() != model_path.resolve():
            shutil.copyfile(source, model_path)

    splits = make_splits(settings, splitter)
    timings["data"] = time.perf_counter() - started

    stores: dict[str, FeatureStore] = {}
    engine_settings = EngineSettings(n_ctx=settings.n_ctx, n_threads=settings.threads)
    with Engine(model_path, engine_settings, prompt=prompt) as engine:
        base = BaseModelRef(registry_name, sha256_file(model_path), engine.architecture, engine.n_layer, engine.n_embd)
        for part in ("train", "calibration", "test"):
            ds = getattr(splits, part)
            stores[part] = extract(engine, ds.texts, ds.labels, splitter, work / part, settings.max_sentences)
    timings["features"] = time.perf_counter() - started - sum(timings.values())

    label_names = splits.train.label_names
    heads = {pooling: train_heads(stores["train"], label_names, pooling, settings.head)[0] for pooling in (SENTENCE, PREFIX)}
    timings["training"] = time.perf_counter() - started - sum(timings.values())

    calibration = calibrate(stores["calibration"], heads, POLICIES, settings.tolerance)
    test = {name: replay(stores["test"], heads, name, point.params) for name, point in calibration.chosen.items()}
    layer_acc = {k: v.round(4).tolist() for k, v in layer_accuracies(stores["test"], heads).items()}
    timings["calibration"] = time.perf_counter() - started - sum(timings.values())

    meets = [n for n, p in calibration.chosen.items() if p.accuracy >= calibration.target]
    default = min(meets, key=lambda n: calibration.chosen[n].cost) if meets else "full"
    bundle = Bundle(
        base=base,
        labels=tuple(label_names),
        task_prompt=prompt,
        splitter=splitter,
        heads=heads,
        policies={name: _plain(point.params) for name, point in calibration.chosen.items()},
        default_policy=default,
        calibration=_plain({**calibration.to_json(), "data": data_settings(settings)}),
        head_kind=settings.head.kind,
        head_hidden=settings.head.hidden if settings.head.kind == "mlp" else 0,
    )
    write_bundle(bundle, out)
    report = ConvertReport(out, splits.describe(), calibration, test, layer_acc, timings)
    (out / MODEL_CARD).write_text(model_card(settings, bundle, report))
    return report


DATA_FIELDS = ("data", "text_column", "label_column", "per_class", "min_sentences", "fractions", "seed", "splitter",
               "language")


def data_settings(settings: ConvertSettings) -> dict[str, Any]:
    """What reproduces the splits (kept in the bundle so that `eval` can find the untouched test split)."""
    return {k: getattr(settings, k) for k in DATA_FIELDS}


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars become Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def model_card(settings: ConvertSettings, bundle: Bundle, report: ConvertReport) -> str:
    base = bundle.base
    rows = "\n".join(
        f"| {name} | {p.accuracy:.3f} | {1 / p.cost:.2f}× | {1 / p.operations:.2f}× | `{json.dumps(p.params)}` |"
        for name, p in report.test.items()
    )
    return f"""# edge2dexit bundle

- base model: {base.name or 'model.gguf in this directory'} ({base.architecture}, {base.n_layer} layers, n_embd {base.n_embd}, sha256 {base.sha256})
- data: {settings.data}; {settings.per_class} documents per class, at least {settings.min_sentences} sentences, at most {settings.max_sentences} read per document; seed {settings.seed}
- labels: {', '.join(bundle.labels)}
- task prompt: {bundle.task_prompt!r}
- sentence splitter: {bundle.splitter.kind} ({bundle.splitter.language})
- heads: {bundle.head_kind} (hidden {bundle.head_hidden}) per layer, on sentence means and on prefix means
- default policy: {bundle.default_policy}

## Splits

```
{report.splits}
```

## Test split (each policy with its parameters calibrated on the calibration split)

Speed-ups are against reading every token through every layer: token-layers as llama.cpp computes them
(re-decodes included), operations as the paper counts them. Accuracy target on calibration:
best single layer ({report.calibration.best_layer}) {report.calibration.best_layer_accuracy:.3f} − {report.calibration.tolerance}.

| policy | accuracy | token-layer speed-up | operation speed-up | parameters |
|---|---|---|---|---|
{rows}

Per-layer test accuracy, whole text (sentence head on the last sentence / prefix head on all sentences):

```
{json.dumps(report.test_layer_accuracy)}
```
"""
