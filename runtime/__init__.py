"""Runtimes that execute compiled femtocc programs (reference runtime and cycle simulator)."""
