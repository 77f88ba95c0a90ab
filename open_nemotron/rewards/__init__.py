"""Verifiable rewards: format (the reasoning toggle), accuracy, instruction checks."""
