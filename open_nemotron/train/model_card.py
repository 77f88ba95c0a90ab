"""The model card that TRL's trainers write into a run directory (`README.md` beside the checkpoints), made right for
a local base model.

TRL's card links the base model on the Hugging Face Hub. A model loaded from a local directory, as every model here
is, renders as "a fine-tuned version of [None](https://huggingface.co/None)", with a quick start that loads the
model "None". Ours names the local base model, the stage and the trainer, and shows how to load the result (no
hub, no `trust_remote_code`).
"""

from __future__ import annotations

from pathlib import Path

from open_nemotron.utils import atomic_write_text


def render_model_card(stage: str, trainer: type, base_model: str, run_dir: str) -> str:
    name = Path(run_dir).name or run_dir
    trl_class = next((c.__name__ for c in trainer.__mro__ if c.__module__.startswith("trl.")), None)
    if trl_class is None or trl_class == trainer.__name__:
        trained_on = f"TRL's `{trl_class or trainer.__name__}`"
    else:
        trained_on = f"`{trainer.__name__}` (TRL's `{trl_class}`)"
    final = str(Path(run_dir) / "final")
    return f"""---
library_name: transformers
tags:
- open-nemotron
- trl
- {stage.lower()}
---

# {name}

{stage} by open-nemotron on {trained_on}, starting from the local model `{base_model}`. The trained model
is `final/` in this directory (checkpoints: `checkpoint-*/`); the stage's results (JSON and markdown) are beside it.
The format is NVIDIA's DeciLM ("nemotron-nas"), which `import open_nemotron` registers with transformers' Auto
classes (no `trust_remote_code`):

```python
import open_nemotron  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{final}")
tokenizer = AutoTokenizer.from_pretrained("{final}")
```

or `open-nemotron generate {final} --prompt "..."`.
"""


def with_local_model_card(trainer_class: type, stage: str) -> type:
    """`trainer_class` whose `create_model_card` (TRL calls it at every checkpoint) writes `render_model_card`."""

    class LocalModelCardTrainer(trainer_class):
        def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
            if not self.is_world_process_zero():
                return
            base = getattr(self.model.config, "_name_or_path", "") or "(unknown)"
            card = render_model_card(stage, trainer_class, base, str(self.args.output_dir))
            atomic_write_text(Path(self.args.output_dir) / "README.md", card)

    LocalModelCardTrainer.__name__ = LocalModelCardTrainer.__qualname__ = trainer_class.__name__
    return LocalModelCardTrainer
