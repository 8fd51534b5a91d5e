"""The bundle: everything a classifier needs besides llama.cpp, and the one file format that carries it.

A bundle is a directory with ``exits.gguf`` (exit heads, labels, prompt, splitter, calibrated policies: see `keys`),
optionally ``model.gguf`` (the base model), ``lora.gguf`` (a llama.cpp LoRA adapter the heads were trained
through, applied to the base model at run time) and ``README.md`` (model card). Users may also name the exits file itself.
The exits file is GGUF so that one toolchain (gguf-py, llama.cpp's viewers) can inspect both files of a bundle.

Loading refuses anything doubtful with one `BundleError` naming the file and the reason: a wrong or damaged bundle
must never classify quietly with the wrong heads. The checks that tie the pieces together (labels vs head outputs,
head inputs vs the base model, layers vs depth, policies) live in `Bundle.validate`, run on construction and on
writing, so a bundle that could not be loaded cannot be written either.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, ReaderTensor

from . import keys
from .cache import sha256_file
from .errors import BundleError, InputError, SettingsError
from .files import replacing
from .calibrated import CalibratedHeads, Scales
from .heads import ExitHead, ExitHeads
from .keys import Key, Keys
from .lexical import LexicalHead
from .trust import ALONE, BEHIND_WORDS, READINGS, MarginTest, Trust
from .models.gguf_file import check_gguf
from .sentences import Splitter
from .texts import label_problem

EXITS_FILE = "exits.gguf"
MODEL_FILE = "model.gguf"
LORA_FILE = "lora.gguf"
MODEL_CARD = "README.md"

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A registry name, optionally with its format (models/registry.py): never a path, so that a bundle cannot point
# the classifier at a file outside its directory.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9_]+)?")
# The adapter is named by a bare file name inside the bundle directory, so a bundle cannot point outside it.
_LORA_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.gguf")
# Keys, tensors and metadata array items an exits file may declare: ~450 in the default bundle, ~2,000 for 128 layers.
# gguf-py's reader builds numpy views per item (~1.5 KB each), so the bound keeps a hostile file under ~25 MB.
MAX_ITEMS = 1 << 14


@dataclass(frozen=True)
class BaseModelRef:
    """The base model a bundle's heads were trained on: heads read its hidden states and fit no other model."""

    name: str  # registry name, or "" for a model given by path
    sha256: str
    architecture: str
    n_layer: int
    n_embd: int

    def describe(self) -> str:
        return f"{self.architecture} ({self.n_layer} layers, {self.n_embd}-dim, sha256 {self.sha256[:8]}…)"


@dataclass(frozen=True)
class LoraRef:
    """A llama.cpp LoRA adapter file in the bundle directory, and the sha256 that ties it to the heads."""

    file: str
    sha256: str


@dataclass
class Bundle:
    base: BaseModelRef
    labels: tuple[str, ...]
    task_prompt: str
    splitter: Splitter
    heads: dict[str, ExitHeads]  # pooling → heads, e.g. "sentence", "prefix"
    scales: Scales  # what turns every head's softmax, and the words', into calibrated probabilities
    policies: dict[str, dict[str, Any]]  # name → calibrated parameters (JSON-able)
    default_policy: str
    calibration: dict[str, Any]  # JSON-able record of how the default was chosen; may be empty
    head_kind: str
    head_hidden: int  # 0 for linear heads
    lora: LoraRef | None = None  # the adapter applied to the base model, when the bundle was fine-tuned
    lexical: LexicalHead | None = None  # the exit on the words alone, before any layer
    # per policy: the lexical head answers when its top probability is at least this (None, or absent: never)
    lexical_thresholds: dict[str, float | None] = field(default_factory=dict)
    # per policy: the parameters calibrated for reading with the lexical exit off; behind the words a policy was
    # calibrated on the documents they leave, and may read too little for the rest (absent: its own parameters)
    llm_only_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # abstention and prediction sets of the default policy, per way of reading (trust.READINGS)
    trust: dict[str, Trust] = field(default_factory=dict)
    directory: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        self.validate()

    @property
    def calibrated_heads(self) -> dict[str, CalibratedHeads]:
        """The heads of every pooling with their scales: what policies read."""
        return {pooling: CalibratedHeads(heads, self.scales.exits[pooling]) for pooling, heads in self.heads.items()}

    def words(self, text: str) -> np.ndarray | None:
        """The lexical head's calibrated probabilities of `text` (None: the bundle has no lexical head)."""
        return None if self.lexical is None else self.scales.words(self.lexical.proba(text))

    def validate(self) -> None:
        """Check that the parts fit together; construction does it, and so does writing (fields may change)."""
        base = self.base
        if not base.architecture or base.n_layer < 1 or base.n_embd < 1:
            raise BundleError(f"base model needs an architecture, layers and an embedding length, got {base}")
        if not _SHA256.fullmatch(base.sha256):
            raise BundleError(f"base model sha256 must be 64 lower-case hex digits, got {base.sha256!r}")
        if base.name and not _MODEL_NAME.fullmatch(base.name):
            raise BundleError(f"base model name {base.name!r} is not a registry name (a bundle names its model, "
                              "it never gives a path)")
        if self.lora is not None:
            if not _LORA_FILE_NAME.fullmatch(self.lora.file) or self.lora.file in (EXITS_FILE, MODEL_FILE):
                raise BundleError(f"LoRA file {self.lora.file!r} must be a bare *.gguf file name in the bundle "
                                  f"directory, neither a path nor {EXITS_FILE} or {MODEL_FILE}")
            if not _SHA256.fullmatch(self.lora.sha256):
                raise BundleError(f"LoRA sha256 must be 64 lower-case hex digits, got {self.lora.sha256!r}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise BundleError(f"a bundle needs at least two distinct labels, got {list(self.labels)}")
        for label in self.labels:
            if (problem := label_problem(label)) is not None:
                raise BundleError(f"label {label!r} {problem}")
        _check_head_kind(self.head_kind)
        if not self.heads:
            raise BundleError("a bundle needs at least one set of exit heads")
        for pooling, heads in self.heads.items():
            self._check_heads(pooling, heads)
        if self.default_policy not in self.policies:
            raise BundleError(f"default policy {self.default_policy!r} is not among the bundle's policies "
                              f"({', '.join(self.policies) or 'none'})")
        self._check_lexical()
        self._check_scales()
        for reading, trust in self.trust.items():
            if reading not in READINGS or trust.policy not in self.policies:
                raise BundleError(f"a trust record is for {reading!r} reading with the policy {trust.policy!r}, "
                                  "which the bundle does not have")
            if trust.params != self.reading_params(trust.policy, reading == BEHIND_WORDS):
                raise BundleError(f"its trust record ({reading}) was calibrated for {trust.params}, not for the "
                                  f"{trust.policy} policy's parameters")

    def _check_scales(self) -> None:
        if (self.scales.words is None) != (self.lexical is None):
            raise BundleError("the lexical exit and its scale must come together")
        for pooling, heads in self.heads.items():
            scales = self.scales.exits.get(pooling, {})
            if set(scales) != set(heads.layers):
                raise BundleError(f"the {pooling} exit heads' scales are for layers {sorted(scales)}, the heads for "
                                  f"{list(heads.layers)}")
            if any((s.fused is None) != (self.lexical is None) for s in scales.values()):
                raise BundleError(f"the {pooling} exit heads need a scale behind the words exactly where the bundle "
                                  "has a lexical head")

    def reading_params(self, policy: str, behind_words: bool) -> dict[str, Any]:
        """Everything that decides how `policy` reads: its parameters, and behind the words their threshold too."""
        params = self.policy_params(policy, behind_words)
        return {**params, "lexical_threshold": self.lexical_threshold(policy)} if behind_words else dict(params)

    def trust_for(self, policy: str, behind_words: bool) -> Trust:
        """The abstention margins and prediction-set thresholds calibrated for reading with `policy` behind the
        lexical exit or without it, at the parameters the bundle reads it with (SettingsError: none calibrated for
        that reading)."""
        reading = BEHIND_WORDS if behind_words else ALONE
        trust = self.trust.get(reading)
        if trust is None:
            raise SettingsError(f"this bundle has no calibrated abstention or prediction sets for reading "
                                f"{reading}: convert it again with this edge2dexit")
        if trust.policy != policy:
            raise SettingsError(f"abstention and prediction sets were calibrated for the {trust.policy} policy "
                                f"of this bundle, not {policy}")
        return trust

    def promise(self, policy: str, behind_words: bool, max_error: float | None,
                coverage: float | None) -> tuple[MarginTest | None, float | None]:
        """What reading with `policy` (behind the words or not) can promise: the abstention margin that keeps the
        error of the answers at most `max_error`, and the prediction-set threshold of `coverage` read with it (None
        where not asked); SettingsError where the bundle cannot promise it."""
        if max_error is None and coverage is None:
            return None, None
        trust = self.trust_for(policy, behind_words)
        abstention = trust.margin_for(max_error) if max_error is not None else None
        margin = 0.0 if abstention is None else abstention.margin
        return abstention, None if coverage is None else trust.conformal_threshold(margin, coverage)

    def _check_lexical(self) -> None:
        if self.lexical is not None and self.lexical.n_classes != len(self.labels):
            raise BundleError(f"the lexical head has {self.lexical.n_classes} classes, the bundle "
                              f"{len(self.labels)} labels")
        if self.lexical_thresholds and self.lexical is None:
            raise BundleError("the bundle has lexical thresholds but no lexical head")
        for policy, threshold in self.lexical_thresholds.items():
            if policy not in self.policies:
                raise BundleError(f"a lexical threshold is given for {policy!r}, which is not a policy of the bundle")
            if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
                raise BundleError(f"the lexical threshold of {policy} must be a probability or null, got "
                                  f"{threshold!r}")
        if self.llm_only_policies and self.lexical is None:
            raise BundleError("the bundle has policy parameters for reading without a lexical head it lacks")
        for policy, params in self.llm_only_policies.items():
            if policy not in self.policies or not isinstance(params, dict):
                raise BundleError(f"the parameters for reading without the words given for {policy!r} must be an "
                                  "object, for a policy of the bundle")

    def lexical_threshold(self, policy: str) -> float | None:
        """The top lexical probability at or above which the words alone answer for `policy` (None: never)."""
        return self.lexical_thresholds.get(policy)

    def _check_heads(self, pooling: str, heads: ExitHeads) -> None:
        _check_pooling(pooling)
        if heads.pooling != pooling:
            raise BundleError(f"the heads filed under pooling {pooling!r} say they are {heads.pooling!r}")
        if heads.labels != self.labels:
            raise BundleError(f"the {pooling} exit heads are for labels {list(heads.labels)}, "
                              f"the bundle's are {list(self.labels)}")
        if heads.n_embd != self.base.n_embd:
            raise BundleError(f"the {pooling} exit heads read {heads.n_embd}-dim states but the base model's "
                              f"embedding length is {self.base.n_embd}")
        if heads.layers[-1] >= self.base.n_layer:
            raise BundleError(f"there is a {pooling} exit head for layer {heads.layers[-1]} but the base model has "
                              f"only {self.base.n_layer} layers (0–{self.base.n_layer - 1})")
        for layer, head in heads.heads.items():
            hidden = head.weights[0][0].shape[0] if self.head_kind == "mlp" else 0
            if head.kind != self.head_kind or hidden != self.head_hidden:
                raise BundleError(f"the {pooling} exit head for layer {layer} is {head.kind!r} with hidden size "
                                  f"{hidden}; the bundle declares {self.head_kind!r} with {self.head_hidden}")

    @property
    def model_file(self) -> Path | None:
        """The base model shipped in the bundle directory, if any (one that cannot be read is refused later, by the
        model's own checks)."""
        if self.directory is None:
            return None
        path = self.directory / MODEL_FILE
        return path if os.path.lexists(path) else None

    def lora_file(self) -> Path | None:
        """The LoRA adapter to apply, checked against the sha256 the exits file records (None: no adapter).
        Heads trained through an adapter mean nothing without it, so a missing or altered file is refused."""
        if self.lora is None:
            return None
        if self.directory is None:
            raise BundleError("a bundle with a LoRA adapter must be loaded from its directory")
        path = self.directory / self.lora.file
        if not path.is_file():
            raise BundleError(f"bundle needs its LoRA adapter {self.lora.file}, which is not in {self.directory}")
        if sha256_file(path) != self.lora.sha256:
            raise BundleError(f"{path} is not the LoRA adapter the heads were trained with (sha256 differs); "
                              "copy the bundle again")
        return path

    def check_base(self, sha256: str, architecture: str, n_layer: int, n_embd: int) -> None:
        """Refuse a model other than the one the heads were trained on: their inputs would be meaningless."""
        model = BaseModelRef(self.base.name, sha256.lower(), architecture, n_layer, n_embd)
        if (model.sha256, architecture, n_layer, n_embd) != (
                self.base.sha256, self.base.architecture, self.base.n_layer, self.base.n_embd):
            raise BundleError(f"bundle was built for {self.base.describe()} but the model is {model.describe()}; "
                              "use the bundle's own base model or convert the heads again for this one")

    def policy_params(self, name: str, behind_words: bool = True) -> dict[str, Any]:
        """Policy `name`'s calibrated parameters: behind the lexical exit, or for reading every text without it."""
        try:
            params = self.policies[name]
        except KeyError:
            raise BundleError(f"bundle has no policy {name!r}; it has {', '.join(self.policies)}") from None
        return params if behind_words else self.llm_only_policies.get(name, params)


def _check_head_kind(kind: str) -> str:
    if kind not in keys.HEAD_LINEARS:
        raise BundleError(f"unknown head kind {kind!r}; expected one of {', '.join(keys.HEAD_LINEARS)}")
    return kind


def _check_pooling(name: str) -> str:
    if not keys.valid_pooling(name):
        raise BundleError(f"pooling name {name!r} must be a lower-case identifier of at most 32 characters "
                          "and not one of base, splitter, head, policy")
    return name


def _metadata(bundle: Bundle) -> list[tuple[Key, Any]]:
    """Every key of the exits file but general.architecture, which GGUFWriter adds itself."""
    base, e = bundle.base, Keys.Exits
    items = [
        (Keys.General.TYPE, keys.GENERAL_TYPE_ADAPTER),
        (Keys.Adapter.TYPE, keys.ADAPTER_TYPE_EDGE2DEXIT),
        (Keys.General.NAME, f"edge2dexit exits for {base.name or base.architecture}"),
        (e.FORMAT_VERSION, keys.FORMAT_VERSION),
        (e.BASE_NAME, base.name),
        (e.BASE_SHA256, base.sha256),
        (e.BASE_ARCHITECTURE, base.architecture),
        (e.BASE_BLOCK_COUNT, base.n_layer),
        (e.BASE_EMBEDDING_LENGTH, base.n_embd),
        (e.LABELS, list(bundle.labels)),
        (e.TASK_PROMPT, bundle.task_prompt),
        (e.SPLITTER_KIND, bundle.splitter.kind),
        (e.SPLITTER_LANGUAGE, bundle.splitter.language),
        (e.HEAD_KIND, bundle.head_kind),
        (e.HEAD_HIDDEN_SIZE, bundle.head_hidden),
        (e.INPUT_NORMALISATION, keys.INPUT_STANDARDISE),
        (e.POOLINGS, list(bundle.heads)),
        (e.DEFAULT_POLICY, bundle.default_policy),
        (e.CALIBRATION, json.dumps(bundle.calibration) if bundle.calibration else ""),
    ]
    lora = bundle.lora or LoraRef("", "")  # no adapter: empty strings
    items += [(e.LORA_FILE, lora.file), (e.LORA_SHA256, lora.sha256),
              (e.LEXICAL_ANALYZER, bundle.lexical.analyzer if bundle.lexical else ""),
              (e.LEXICAL_THRESHOLDS, json.dumps(bundle.lexical_thresholds)),
              (e.LLM_ONLY_POLICIES, json.dumps(bundle.llm_only_policies)),
              (e.SCALES, json.dumps(bundle.scales.to_json())),
              (e.TRUST, json.dumps({reading: trust.to_json() for reading, trust in bundle.trust.items()}))]
    items += [(Keys.exit_layers(p), list(h.layers)) for p, h in bundle.heads.items()]
    items += [(Keys.policy(name), json.dumps(params)) for name, params in bundle.policies.items()]
    return items


def _tensors(bundle: Bundle, half: bool) -> list[tuple[str, np.ndarray]]:
    """Every exit tensor. Like llama.cpp's converters, `half` stores the heads' matrices as F16 and keeps vectors
    F32; the lexical head stays F32, so that the runtime computes what scikit-learn fitted."""
    out = []
    for pooling, heads in bundle.heads.items():
        for layer, head in heads.heads.items():
            out += zip(keys.norm_tensors(pooling, layer), (head.norm_mean, head.norm_scale))
            for names, pair in zip(keys.linear_tensors(pooling, layer, head.kind), head.weights):
                out += zip(names, pair)
    tensors = [(name, np.ascontiguousarray(a, dtype=np.float16 if half and a.ndim == 2 else np.float32))
               for name, a in out]
    if bundle.lexical is not None:
        lexical = bundle.lexical
        vocabulary = np.frombuffer("\n".join(lexical.vocabulary).encode("utf-8"), dtype=np.int8)
        tensors += zip(keys.LEXICAL_TENSORS, (vocabulary, lexical.idf, lexical.weight, lexical.bias))
    return tensors


def write_exits(bundle: Bundle, path: str | os.PathLike[str], half: bool = True) -> Path:
    """Write the exits file."""
    bundle.validate()
    return _write_gguf(path, bundle.base.architecture, _metadata(bundle), _tensors(bundle, half))


def write_lora(path: str | os.PathLike[str], architecture: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
               alpha: float) -> Path:
    """Write a llama.cpp LoRA adapter file: for each base tensor name (e.g. "blk.3.attn_q.weight") the pair
    (A [rank, in], B [out, rank]); llama.cpp adds (alpha / rank) · B·A·x to that tensor's product with x.
    Stored as F32, so the runtime applies exactly the matrices trained."""
    metadata = [(Keys.General.TYPE, keys.GENERAL_TYPE_ADAPTER), (Keys.Adapter.TYPE, keys.ADAPTER_TYPE_LORA),
                (Keys.Adapter.LORA_ALPHA, float(alpha))]
    tensors = [(name, np.ascontiguousarray(m, dtype=np.float32))
               for base, pair in pairs.items() for name, m in zip(keys.lora_tensors(base), pair)]
    return _write_gguf(path, architecture, metadata, tensors)


def _write_gguf(path: str | os.PathLike[str], architecture: str, metadata: list[tuple[Key, Any]],
                tensors: list[tuple[str, np.ndarray]]) -> Path:
    """Write a GGUF file whole or not at all (`files.replacing`): a crash never leaves half a bundle."""
    path = Path(path)
    with replacing(path) as tmp:
        writer = GGUFWriter(tmp, arch=architecture)
        try:
            for key, value in metadata:
                writer.add_key_value(key.name, value, key.type, key.item)  # not add_string: it drops empty strings
            for name, array in tensors:
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def write_bundle(bundle: Bundle, directory: str | os.PathLike[str], half: bool = True) -> Path:
    """Write `directory`/exits.gguf (creating the directory); the base model and model card are the caller's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_exits(bundle, directory / EXITS_FILE, half)


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and validate a bundle directory or exits file; every refusal is one BundleError naming the file."""
    path = Path(path)
    if stat.S_ISDIR(_mode(path, f"bundle not found: {path} is neither a bundle directory nor an exits file")):
        path = path / EXITS_FILE
        _mode(path, f"{path.parent} is not a bundle: it has no {EXITS_FILE}")
    try:
        bundle = _read(path)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except UnicodeDecodeError:  # gguf-py decodes a string only when asked for its contents
        raise BundleError(f"{path}: a string in its metadata is not UTF-8; copy or export the bundle again") from None
    bundle.directory = path.parent
    return bundle


def _mode(path: Path, missing: str) -> int:
    """The file mode of `path`, or BundleError: `missing` when nothing is there, else why it cannot be reached (a
    symlink loop, no permission)."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _open(path: Path) -> GGUFReader:
    check_gguf(path, BundleError, MAX_ITEMS)
    try:
        return GGUFReader(path)
    except Exception as exc:  # the header walk passed, so this is damage gguf-py alone notices
        raise BundleError(f"GGUF file is corrupt ({type(exc).__name__}: {exc}); copy or export the bundle again") from None


def _value(reader: GGUFReader, key: Key) -> Any:
    f = reader.get_field(key.name)
    if f is None:
        raise BundleError(f"missing key {key.name}")
    # An empty array has no item type: accept it and let the checks on its content speak.
    if f.types[0] != key.type or (key.item is not None and f.types[1:] not in ([], [key.item])):
        found = "/".join(t.name for t in f.types)
        raise BundleError(f"key {key.name} is {found}, expected {key.describe()}")
    return f.contents()


def _json_object(key: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"key {key} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BundleError(f"key {key} must hold a JSON object, got {type(value).__name__}")
    return value


def _read(path: Path) -> Bundle:
    reader = _open(path)
    for key, expected in ((Keys.General.TYPE, keys.GENERAL_TYPE_ADAPTER),
                          (Keys.Adapter.TYPE, keys.ADAPTER_TYPE_EDGE2DEXIT)):
        f = reader.get_field(key.name)
        found = f.contents() if f is not None and f.types == [key.type] else None
        if found != expected:
            raise BundleError(f"not an edge2dexit exits file ({key.name} = {found!r}, expected {expected!r})")
    e = Keys.Exits
    version = _value(reader, e.FORMAT_VERSION)
    if version > keys.FORMAT_VERSION:
        raise BundleError(f"written in exits format version {version}, this edge2dexit reads up to version "
                          f"{keys.FORMAT_VERSION}: upgrade edge2dexit")
    if version < keys.FORMAT_VERSION:
        raise BundleError(f"written in exits format version {version} by an older edge2dexit, whose probabilities "
                          "were not calibrated: convert the bundle again (convert --reuse OLD/features reads "
                          "nothing again)")
    normalisation = _value(reader, e.INPUT_NORMALISATION)
    if normalisation != keys.INPUT_STANDARDISE:
        raise BundleError(f"unknown input normalisation {normalisation!r}")

    base = BaseModelRef(
        name=_value(reader, e.BASE_NAME),
        sha256=_value(reader, e.BASE_SHA256),
        architecture=_value(reader, e.BASE_ARCHITECTURE),
        n_layer=_value(reader, e.BASE_BLOCK_COUNT),
        n_embd=_value(reader, e.BASE_EMBEDDING_LENGTH),
    )
    labels = tuple(_value(reader, e.LABELS))
    head_kind = _check_head_kind(_value(reader, e.HEAD_KIND))  # before it is used to build tensor names
    try:
        splitter = Splitter(_value(reader, e.SPLITTER_KIND), _value(reader, e.SPLITTER_LANGUAGE))
    except InputError as exc:
        raise BundleError(str(exc)) from None

    tensors = {t.name: t for t in reader.tensors}
    heads = {}
    for pooling in map(_check_pooling, _value(reader, e.POOLINGS)):
        layers_key = Keys.exit_layers(pooling)
        layers = _value(reader, layers_key)
        if len(set(layers)) != len(layers):
            raise BundleError(f"{layers_key.name} lists a layer twice: {layers}")
        heads[pooling] = ExitHeads(pooling, labels, {
            layer: _read_head(tensors, pooling, layer, head_kind) for layer in layers})
    used = {name for pooling, h in heads.items() for layer in h.layers
            for name in keys.head_tensors(pooling, layer, head_kind)}
    analyzer = _value(reader, e.LEXICAL_ANALYZER)
    used |= set(keys.LEXICAL_TENSORS) if analyzer else set()
    unused = tensors.keys() - used
    if unused:
        raise BundleError(f"holds tensors that belong to no exit head of the bundle: {', '.join(sorted(unused))}")

    policies = {}
    for key in reader.fields:
        name = keys.policy_name(key)
        if name is not None:
            policies[name] = _json_object(key, _value(reader, Keys.policy(name)))
    calibration = _value(reader, e.CALIBRATION)
    lora_file = _value(reader, e.LORA_FILE)
    lora = LoraRef(lora_file, _value(reader, e.LORA_SHA256)) if lora_file else None
    trust = {reading: Trust.from_json(record)
             for reading, record in _json_object(e.TRUST.name, _value(reader, e.TRUST)).items()}
    return Bundle(
        base=base,
        labels=labels,
        task_prompt=_value(reader, e.TASK_PROMPT),
        splitter=splitter,
        heads=heads,
        policies=policies,
        default_policy=_value(reader, e.DEFAULT_POLICY),
        calibration=_json_object(e.CALIBRATION.name, calibration) if calibration else {},
        head_kind=head_kind,
        head_hidden=_value(reader, e.HEAD_HIDDEN_SIZE),
        lora=lora,
        lexical=_read_lexical(tensors, analyzer) if analyzer else None,
        lexical_thresholds=_json_object(e.LEXICAL_THRESHOLDS.name, _value(reader, e.LEXICAL_THRESHOLDS)),
        llm_only_policies=_json_object(e.LLM_ONLY_POLICIES.name, _value(reader, e.LLM_ONLY_POLICIES)),
        scales=Scales.from_json(_json_object(e.SCALES.name, _value(reader, e.SCALES))),
        trust=trust,
    )


def _read_lexical(tensors: dict[str, ReaderTensor], analyzer: str) -> LexicalHead:
    arrays = []
    for name in keys.LEXICAL_TENSORS:
        t = tensors.get(name)
        expected = GGMLQuantizationType.I8 if name == keys.LEXICAL_TENSORS[0] else GGMLQuantizationType.F32
        if t is None or t.tensor_type != expected:
            raise BundleError(f"the lexical head needs the tensor {name} of type {expected.name}")
        arrays.append(np.array(t.data))
    vocabulary, idf, weight, bias = arrays
    try:
        words = tuple(vocabulary.view(np.uint8).tobytes().decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        raise BundleError("the lexical head's vocabulary is not UTF-8") from None
    return LexicalHead(words, idf, weight, bias, analyzer)


_F32 = (GGMLQuantizationType.F32,)
_F16_OR_F32 = (GGMLQuantizationType.F16, GGMLQuantizationType.F32)


def _read_head(tensors: dict[str, ReaderTensor], pooling: str, layer: int, kind: str) -> ExitHead:
    def array(name: str, allowed: tuple[GGMLQuantizationType, ...]) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise BundleError(f"missing tensor {name}")
        if t.tensor_type not in allowed:
            raise BundleError(f"tensor {name} is {t.tensor_type.name}; expected {' or '.join(a.name for a in allowed)}")
        return np.array(t.data)  # a copy: the reader's memory map is released with the reader

    mean, scale = (array(name, _F32) for name in keys.norm_tensors(pooling, layer))
    weights = tuple((array(w, _F16_OR_F32), array(b, _F16_OR_F32))
                    for w, b in keys.linear_tensors(pooling, layer, kind))
    return ExitHead(layer, kind, mean, scale, weights)
