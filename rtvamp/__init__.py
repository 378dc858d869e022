"""rtvamp: a real-time engine for VampNet (masked acoustic token music generation)."""

__version__ = "0.1.0"
