"""specdecpp: an OpenAI-compatible server with SpecDec++ speculative decoding."""

__version__ = "0.1.0"
