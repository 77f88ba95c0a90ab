"""open-nemotron: parts of Llama-Nemotron's pipeline for any Llama: the heterogeneous nemotron-nas model, Puzzle
NAS, reasoning data, toggle SFT, the on/off eval and an OpenAI-compatible server (distillation, fusion, RL and
export are not built yet).

Importing the package registers the heterogeneous "nemotron-nas" model with the `transformers` Auto classes.
"""

from open_nemotron.model import register as _register

_register()

__version__ = "0.1.0"
