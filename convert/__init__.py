"""Checkpoint -> GGUF conversion for PULSE-7B (LLaVA-1.6); the runtime never imports this package."""
