"""Errors of the writers, in a module of their own so that the GGUF writer and its tokenizer part share one."""


class GGUFExportError(ValueError):
    """The model (or its tokenizer) cannot be written as a GGUF llama.cpp reads; the message says why."""
