"""The benchmarks' baseline: the same model read the plain way, as any prompt-based classifier would — a context with
no eval callback, the task prompt decoded once, each text in one full-depth decode."""

from __future__ import annotations

from ..engine import PROMPT_SEQ, Engine
from ..lifetime import Owner
from ..llama import NO_TAP, Context, ContextSettings, Span


class PlainReader(Owner):
    """Reads token streams after `engine`'s task prompt, at full depth, in a context of its own (the same model and
    LoRA adapter, like for like)."""

    def __init__(self, engine: Engine):
        super().__init__()
        n_prompt = len(engine.prompt_tokens)
        settings = ContextSettings(engine.settings.n_ctx, 1, engine.context.n_batch, engine.context.settings.n_threads,
                                   tap=NO_TAP)
        self.n_layer, self.n_prompt = engine.n_layer, n_prompt
        self.context = self._resources.enter_context(Context(engine.model, settings, engine.context.lora))
        self.context.decode([Span(PROMPT_SEQ, 0, engine.prompt_tokens)], self.n_layer, ())

    def read(self, tokens: list[int]) -> None:
        self.context.remove(PROMPT_SEQ, self.n_prompt)
        self.context.decode([Span(PROMPT_SEQ, self.n_prompt, tokens)], self.n_layer, ())
