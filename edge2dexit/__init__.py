"""edge2dexit: two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp."""
