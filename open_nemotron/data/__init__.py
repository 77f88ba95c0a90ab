"""Reasoning data: the Llama-Nemotron row schema, task sources (reasoning-gym, math jsonl) and built-in solvers."""
