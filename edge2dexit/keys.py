"""Every GGUF key and tensor name edge2dexit reads or writes, in one place (the style of gguf-py's `constants`).

An exits file is a GGUF *adapter* (``general.type = "adapter"``) whose ``adapter.type`` is "edge2dexit", so that
llama.cpp refuses it as a LoRA instead of misreading it. Everything edge2dexit-specific lives under
``edge2dexit.``; each exit head is a handful of tensors named ``exit.<pooling>.<layer>.<part>``.
Nothing else in the package spells a key or tensor name as a literal.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1  # bump on any change an older reader would misread

# Values of fixed keys.
GENERAL_TYPE_ADAPTER = "adapter"
ADAPTER_TYPE_EDGE2DEXIT = "edge2dexit"
INPUT_STANDARDISE = "standardise"  # x' = (x - norm_mean) / norm_scale, per dimension


class Keys:
    class General:
        TYPE = "general.type"
        ARCHITECTURE = "general.architecture"  # the base model's, as llama.cpp expects of an adapter
        NAME = "general.name"
        ALIGNMENT = "general.alignment"  # uint32; read from base models, never written (GGUF's default of 32)

    class Adapter:
        TYPE = "adapter.type"

    class Exits:
        FORMAT_VERSION = "edge2dexit.format_version"  # uint32
        BASE_NAME = "edge2dexit.base.name"  # registry name, or "" for a model given by path
        BASE_SHA256 = "edge2dexit.base.sha256"
        BASE_ARCHITECTURE = "edge2dexit.base.architecture"
        BASE_BLOCK_COUNT = "edge2dexit.base.block_count"  # uint32, layers
        BASE_EMBEDDING_LENGTH = "edge2dexit.base.embedding_length"  # uint32
        LABELS = "edge2dexit.labels"  # string array, class index order
        TASK_PROMPT = "edge2dexit.task_prompt"
        SPLITTER_KIND = "edge2dexit.splitter.kind"
        SPLITTER_LANGUAGE = "edge2dexit.splitter.language"
        HEAD_KIND = "edge2dexit.head.kind"  # one of HEAD_LINEARS
        HEAD_HIDDEN_SIZE = "edge2dexit.head.hidden_size"  # uint32, 0 for linear heads
        INPUT_NORMALISATION = "edge2dexit.input_normalisation"
        POOLINGS = "edge2dexit.poolings"  # string array: the head sets present
        DEFAULT_POLICY = "edge2dexit.default_policy"
        CALIBRATION = "edge2dexit.calibration"  # JSON object string, or ""
        POLICY_PREFIX = "edge2dexit.policy."  # + policy name: JSON object string of its parameters


def exit_layers_key(pooling: str) -> str:
    """uint32 array: the layers that have a head of this pooling."""
    return f"edge2dexit.{pooling}.exit_layers"


def policy_key(name: str) -> str:
    return Keys.Exits.POLICY_PREFIX + name


def policy_name(key: str) -> str | None:
    """The policy a key holds, or None when it is not a policy key (policies are found by prefix, not listed)."""
    prefix = Keys.Exits.POLICY_PREFIX
    return key[len(prefix):] if key.startswith(prefix) else None


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
