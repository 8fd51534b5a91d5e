"""Every GGUF key and tensor name edge2dexit reads or writes, each key with its GGUF type, in one place (the style
of gguf-py's `constants`). The bundle's writer and reader both take the types from here.

An exits file is a GGUF *adapter* (``general.type = "adapter"``) whose ``adapter.type`` is "edge2dexit", so that
llama.cpp refuses it as a LoRA instead of misreading it. Everything edge2dexit-specific lives under
``edge2dexit.``; each exit head is a handful of tensors named ``exit.<pooling>.<layer>.<part>``.
Nothing else in the package spells a key or tensor name as a literal.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from gguf import GGUFValueType

# Bump on any change an older reader would misread. 6: calibrated probabilities (a scale per exit head and for the
# lexical exit) and trust records bound to their parameters, for both ways of reading; a reader of 5 would read
# uncalibrated probabilities against margins calibrated on calibrated ones. Every key is always present (empty where
# a bundle has no such part), so that a key lost to damage is a missing key, never a part silently left out. Older
# formats are refused: their probabilities were never calibrated, and `convert --reuse OLD/features` rebuilds them
# without reading anything again.
FORMAT_VERSION = 6

# Values of fixed keys.
GENERAL_TYPE_ADAPTER = "adapter"
ADAPTER_TYPE_EDGE2DEXIT = "edge2dexit"
ADAPTER_TYPE_LORA = "lora"  # llama.cpp's own LoRA adapter files (src/llama-adapter.cpp)
INPUT_STANDARDISE = "standardise"  # x' = (x - norm_mean) / norm_scale, per dimension


class Key(NamedTuple):
    """A metadata key: its name, its GGUF value type and, for arrays, the type of the items."""

    name: str
    type: GGUFValueType
    item: GGUFValueType | None = None

    def describe(self) -> str:
        return self.type.name + (f"/{self.item.name}" if self.item is not None else "")


def _str(name: str) -> Key:
    return Key(name, GGUFValueType.STRING)


def _u32(name: str) -> Key:
    return Key(name, GGUFValueType.UINT32)


def _f32(name: str) -> Key:
    return Key(name, GGUFValueType.FLOAT32)


def _array(name: str, item: GGUFValueType) -> Key:
    return Key(name, GGUFValueType.ARRAY, item)


class Keys:
    class General:
        TYPE = _str("general.type")
        ARCHITECTURE = _str("general.architecture")  # the base model's, as llama.cpp expects of an adapter
        NAME = _str("general.name")
        ALIGNMENT = _u32("general.alignment")  # read from base models, never written (GGUF's default of 32)

    class Adapter:
        TYPE = _str("adapter.type")
        LORA_ALPHA = _f32("adapter.lora.alpha")  # llama.cpp scales B·A·x by alpha / rank

    class Exits:
        FORMAT_VERSION = _u32("edge2dexit.format_version")
        BASE_NAME = _str("edge2dexit.base.name")  # registry name (with its format), or "" for a model given by path
        BASE_SHA256 = _str("edge2dexit.base.sha256")
        BASE_ARCHITECTURE = _str("edge2dexit.base.architecture")
        BASE_BLOCK_COUNT = _u32("edge2dexit.base.block_count")  # layers
        BASE_EMBEDDING_LENGTH = _u32("edge2dexit.base.embedding_length")
        LABELS = _array("edge2dexit.labels", GGUFValueType.STRING)  # class index order
        TASK_PROMPT = _str("edge2dexit.task_prompt")
        SPLITTER_KIND = _str("edge2dexit.splitter.kind")
        SPLITTER_LANGUAGE = _str("edge2dexit.splitter.language")
        HEAD_KIND = _str("edge2dexit.head.kind")  # one of HEAD_LINEARS
        HEAD_HIDDEN_SIZE = _u32("edge2dexit.head.hidden_size")  # 0 for linear heads
        INPUT_NORMALISATION = _str("edge2dexit.input_normalisation")
        POOLINGS = _array("edge2dexit.poolings", GGUFValueType.STRING)  # the head sets present
        DEFAULT_POLICY = _str("edge2dexit.default_policy")
        CALIBRATION = _str("edge2dexit.calibration")  # JSON object, or ""
        # a llama.cpp LoRA adapter applied to the base model, whose states the heads read ("" and "": none)
        LORA_FILE = _str("edge2dexit.lora.file")  # a bare file name in the bundle directory, never a path
        LORA_SHA256 = _str("edge2dexit.lora.sha256")
        # the lexical exit (lexical.py; "": none), its tensors LEXICAL_TENSORS, and per policy the top calibrated
        # probability at or above which it answers (JSON object: policy -> threshold, or null: never)
        LEXICAL_ANALYZER = _str("edge2dexit.lexical.analyzer")
        LEXICAL_THRESHOLDS = _str("edge2dexit.lexical.thresholds")
        # per policy, the parameters calibrated for reading with the lexical exit off (JSON object: policy ->
        # parameters; a policy absent reads with its own, as where the words never pay)
        LLM_ONLY_POLICIES = _str("edge2dexit.lexical.llm_only_policies")
        # the scale of every exit head and of the lexical exit (calibrated.py `Scales`), JSON
        SCALES = _str("edge2dexit.scales")
        # abstention and prediction sets of one policy, per way of reading (trust.py), JSON: reading -> record
        TRUST = _str("edge2dexit.trust")

    @staticmethod
    def exit_layers(pooling: str) -> Key:
        """The layers that have a head of this pooling."""
        return _array(f"edge2dexit.{pooling}.exit_layers", GGUFValueType.UINT32)

    POLICY_PREFIX = "edge2dexit.policy."

    @staticmethod
    def policy(name: str) -> Key:
        """A policy's calibrated parameters, as a JSON object."""
        return _str(Keys.POLICY_PREFIX + name)


def policy_name(key: str) -> str | None:
    """The policy a key holds, or None when it is not a policy key (policies are found by prefix, not listed)."""
    return key[len(Keys.POLICY_PREFIX):] if key.startswith(Keys.POLICY_PREFIX) else None


# A pooling name becomes part of key and tensor names: keep it a short identifier (llama.cpp caps tensor names at
# 63 bytes) and never a word that would make `edge2dexit.<pooling>.exit_layers` collide with another key.
_POOLING_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RESERVED_POOLINGS = frozenset({"base", "splitter", "head", "policy"})


def valid_pooling(name: str) -> bool:
    return bool(_POOLING_NAME.fullmatch(name)) and name not in _RESERVED_POOLINGS


# Each head kind is a chain of linear layers (ReLU between them); these are their tensor-name stems.
HEAD_LINEARS: dict[str, tuple[str, ...]] = {"mlp": ("fc1", "fc2"), "linear": ("fc",)}


def exit_tensor(pooling: str, layer: int, part: str) -> str:
    return f"exit.{pooling}.{layer}.{part}"


def norm_tensors(pooling: str, layer: int) -> tuple[str, str]:
    """(norm_mean, norm_scale) tensor names: the input standardisation, [d] F32 each."""
    return exit_tensor(pooling, layer, "norm_mean"), exit_tensor(pooling, layer, "norm_scale")


def linear_tensors(pooling: str, layer: int, kind: str) -> tuple[tuple[str, str], ...]:
    """(weight, bias) tensor names of each linear layer of a head: weight [out, in], bias [out]."""
    return tuple(
        (exit_tensor(pooling, layer, f"{stem}.weight"), exit_tensor(pooling, layer, f"{stem}.bias"))
        for stem in HEAD_LINEARS[kind]
    )


def head_tensors(pooling: str, layer: int, kind: str) -> tuple[str, ...]:
    """Every tensor name of one head."""
    return norm_tensors(pooling, layer) + sum(linear_tensors(pooling, layer, kind), ())


# The lexical head's tensors: the vocabulary as UTF-8 bytes, n-grams separated by line breaks (I8: gguf-py's reader
# makes several objects per string array item, 1.8 s and 40 MB for 30,000), its idf [V] F32, weight [C, V] F32 and
# bias [C] F32.
LEXICAL_TENSORS = ("lexical.vocabulary", "lexical.idf", "lexical.weight", "lexical.bias")


def lora_tensors(base_tensor: str) -> tuple[str, str]:
    """(A, B) tensor names of a LoRA on the base model's tensor `base_tensor` (e.g. "blk.3.attn_q.weight"):
    A [rank, in] and B [out, rank] as numpy shapes, the orientation peft keeps them in."""
    return f"{base_tensor}.lora_a", f"{base_tensor}.lora_b"


def layer_output(layer: int) -> bytes:
    """llama.cpp's graph name of the output of layer `layer` (docs/llama-cpp.md §3), as the eval callback sees it."""
    return f"l_out-{layer}".encode()
