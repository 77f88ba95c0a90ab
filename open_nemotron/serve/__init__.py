"""Serving: the continuous-batching generation engine (`engine.py`)."""
