"""open-nemotron: Llama-Nemotron's pipeline (Puzzle NAS, fusion, distillation, reasoning SFT/RL) for any Llama.

Importing the package registers the heterogeneous "nemotron-nas" model with the `transformers` Auto classes.
"""

from open_nemotron.model import register as _register

_register()

__version__ = "0.1.0"
