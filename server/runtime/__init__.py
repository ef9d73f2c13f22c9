"""Runtimes that execute the registration and per-frame graphs."""
