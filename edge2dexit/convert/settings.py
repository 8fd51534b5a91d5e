"""What `convert` takes, in one place and free of torch: the CLI builds its options (and their defaults) from these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..sentences import Splitter
from ..settings import EngineSettings

DEFAULT_FRACTIONS = (0.5, 0.25, 0.25)  # train / calibration / test


@dataclass(frozen=True)
class DataSettings:
    """Everything that reproduces a data set's splits; a bundle keeps it so that `eval` finds the untouched test
    split again."""

    data: str  # built-in set name (imdb, clothing, tweets) or a CSV / TSV / JSONL file
    text_column: str = "text"
    label_column: str = "label"
    per_class: int | None = 300  # balanced subsample size per class (None: everything)
    min_sentences: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = 0
    splitter: str = "pysbd"
    language: str = "en"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(self.fractions))  # a list when read back from JSON

    def make_splitter(self) -> Splitter:
        return Splitter(self.splitter, self.language)



# The task prompt read before every text, when `convert --prompt` names none: for the imdb set, and for any other.
SENTIMENT_PROMPT = "Classify the sentiment of this movie review as positive or negative.\nReview:"
DEFAULT_PROMPT = "Classify the following text.\nText:"
# Formats `convert --quant` re-quantizes a base model to (llama.QUANT_TYPES maps each to llama.cpp's file type).
QUANTIZATIONS = ("f16", "q4_0", "q8_0")


@dataclass(frozen=True)
class TrainSettings:
    kind: str = "mlp"  # "mlp": the paper's adapter Linear(d→hidden) + ReLU + Linear(hidden→C); or "linear"
    hidden: int = 64  # the paper uses 256; 64 was as accurate on IMDB and is 4× smaller
    epochs: int = 60  # at most; early stopping usually ends sooner
    batch: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-4
    patience: int = 6  # epochs without a better validation loss before stopping
    validation_fraction: float = 0.15  # of the documents of each class
    seed: int = 0
    layers: tuple[int, ...] | None = None  # None: every layer
    threads: int | None = None  # torch intra-op threads; None leaves torch's setting alone

    def __post_init__(self) -> None:
        from ..keys import HEAD_LINEARS  # gguf-py, once settings are made, not when the CLI builds its options

        if self.kind not in HEAD_LINEARS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {', '.join(HEAD_LINEARS)}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie strictly between 0 and 1, got {self.validation_fraction}")
        if min(self.hidden, self.epochs, self.batch, self.patience) < 1:
            raise ValueError("hidden, epochs, batch and patience must all be at least 1")


@dataclass(frozen=True)
class LoraSettings:
    """`convert --finetune lora`: adapters on the base model trained with the paper's multi-layer loss."""

    rank: int = 8
    alpha: float = 16.0  # peft's lora_alpha: the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # Hugging Face names of the projections adapted, every layer
    epochs: int = 2
    lr: float = 5e-4  # of the adapters
    head_lr: float = 3e-3  # of the auxiliary heads, which start from nothing
    batch: int = 8  # documents per optimiser step
    last_weight: float = 0.8  # the paper's loss: 0.8 on the last layer, 0.1 on each other, normalised
    other_weight: float = 0.1
    validation_fraction: float = 0.15  # of the training documents, by class, to choose the epoch
    max_documents: int | None = None  # train the adapters on at most this many (CPU time); heads use every one
    # train through the first `depth` layers only, where the policies exit: adapters on those layers, the loss's
    # last weight on layer depth - 1, and depth / n_layer of the compute. None: every layer, as the paper
    depth: int | None = None
    stats_documents: int = 32  # documents whose base states standardise the auxiliary heads' inputs
    seed: int = 0
    # training documents between checkpoints within an epoch: a run cut off (a session's end) loses at most these
    # (~3 min on a 2-core CPU at depth 15) instead of the whole epoch (~1 h for 4,000 reviews)
    checkpoint_every: int = 256

    def __post_init__(self) -> None:
        if min(self.rank, self.epochs, self.batch, self.stats_documents, self.checkpoint_every, self.depth or 1) < 1 or self.alpha <= 0:
            raise ValueError("rank, epochs, batch, stats_documents, checkpoint_every and depth must be at least 1 and alpha positive")
        if not self.targets:
            raise ValueError("LoRA needs at least one target projection")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie strictly between 0 and 1, got {self.validation_fraction}")


@dataclass(frozen=True)
class ConvertSettings:
    model: str  # registry name, GGUF path, or a Hugging Face checkpoint directory
    data: DataSettings
    out: Path
    prompt: str | None = None  # default: a sentiment prompt for imdb, a generic one otherwise
    max_sentences: int | None = 20  # sentences per document kept for features (bounds the cost)
    head: TrainSettings = field(default_factory=TrainSettings)
    tolerance: float = 0.02  # accuracy a policy's operating point may lose against the best single layer
    confidence: float = 0.95  # with which the loss must be at most `tolerance` on calibration (0: as measured)
    quant: str = "keep"
    engine: EngineSettings = field(default_factory=EngineSettings)  # how features are read (width: batching)
    work: Path | None = None  # feature stores (default: OUT/features); reused when the inputs match
    reuse: tuple[Path, ...] = ()  # earlier feature stores whose documents are copied instead of read again
    finetune: LoraSettings | None = None  # None: heads only, the base model frozen (the paper's first mode)
    lexical: bool = True  # also train the lexical exit (lexical.py) and calibrate every policy behind it
    # cross-fitting: the heads and the lexical exit are trained on K folds of the training and calibration documents
    # together, and calibrated on the out-of-fold reads of all of them (1: the training split trains, the
    # calibration split calibrates)
    folds: int = 5
    # behind the words, weigh their evidence into the LLM's answers (the γ of calibrated.py); off, they only decide
    # which texts the LLM reads and how sure its answers may be
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.folds < 1:
            raise ValueError(f"folds must be at least 1, got {self.folds}")


