"""The reasoning switch of Llama-Nemotron as chat templates, plus a parser for `<think>` blocks.

The paper's switch is a system message that is exactly ``detailed thinking on`` or ``detailed thinking off``;
reasoning-on answers put their reasoning in ``<think>…</think>`` before the answer, reasoning-off answers have no
tags. The templates built here keep the parent's own chat format (ChatML or Llama-3), map the Qwen-style
``enable_thinking`` template variable onto that system message, and come in two variants:

* inference (the tokenizer's default): reasoning is stripped from earlier assistant turns, as LN-Ultra's template does;
* training (the named template ``"training"``): every turn is kept verbatim and each assistant message plus its
  end-of-turn token is wrapped in ``{% generation %}`` so that TRL's ``assistant_only_loss=True`` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from open_nemotron.errors import OpenNemotronError

THINKING_ON = "detailed thinking on"
THINKING_OFF = "detailed thinking off"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

SUPPORTED_FORMATS = ("chatml", "llama3")
TRAINING_TEMPLATE_NAME = "training"

_CHATML_MARKER = "<|im_start|>"
_LLAMA3_MARKER = "<|start_header_id|>"


class UnsupportedChatFormatError(OpenNemotronError, ValueError):
    """The parent's chat template is neither ChatML nor Llama-3."""


def detect_chat_format(template: str | None) -> str:
    """Return ``"chatml"`` or ``"llama3"`` for a parent chat template; raise `UnsupportedChatFormatError` otherwise."""
    if template is None:
        raise UnsupportedChatFormatError(
            "found no chat template (None); supported chat formats are chatml (<|im_start|>) and llama3 "
            "(<|start_header_id|>)"
        )
    if _CHATML_MARKER in template:
        return "chatml"
    if _LLAMA3_MARKER in template:
        return "llama3"
    # repr() keeps the excerpt on one line even when the template has newlines.
    raise UnsupportedChatFormatError(
        f"found a chat template with neither <|im_start|> nor <|start_header_id|> (starts {template[:60]!r}); "
        "supported chat formats are chatml and llama3"
    )


@dataclass(frozen=True)
class _Format:
    """How a parent format writes one turn: bos + header_open + role + header_close + content + eot + after_eot."""

    bos: str
    header_open: str
    header_close: str
    eot: str
    after_eot: str
    # Meta's Llama-3 templates trim every message; SmolLM2/Qwen's ChatML prints content as is.
    trim: bool


_FORMATS: dict[str, _Format] = {
    "chatml": _Format(
        bos="", header_open="<|im_start|>", header_close="\n", eot="<|im_end|>", after_eot="\n", trim=False
    ),
    "llama3": _Format(
        bos="{{- bos_token }}",
        header_open="<|start_header_id|>",
        header_close="<|end_header_id|>\n\n",
        eot="<|eot_id|>",
        after_eot="",
        trim=True,
    ),
}

_TEMPLATE = """\
{#- open-nemotron reasoning template (@FMT@, @VARIANT@). The system message is the reasoning switch:
    enable_thinking (if given) > a first system message that is exactly a control string > on. -#}
{%- set think_on = '@ON@' %}
{%- set think_off = '@OFF@' %}
{%- set ns = namespace(control=none, extra='', start=0) %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set ns.start = 1 %}
    {%- if messages[0]['content'] == think_on or messages[0]['content'] == think_off %}
        {%- set ns.control = messages[0]['content'] %}
    {%- else %}
        {%- set ns.extra = messages[0]['content']@TRIM@ %}
    {%- endif %}
{%- endif %}
{%- if enable_thinking is defined and enable_thinking is not none %}
    {%- set ns.control = think_on if enable_thinking else think_off %}
{%- elif ns.control is none %}
    {%- set ns.control = think_on %}
{%- endif %}
{%- set system_message = ns.control + ('\\n\\n' + ns.extra if ns.extra else '') %}
@BOS@
{{- '@HO@system@HC@' + system_message + '@EOT@@AFTER@' }}
{%- for message in messages[ns.start:] %}
    {%- if message['role'] == 'assistant' %}
@ASSISTANT@
    {%- else %}
        {{- '@HO@' + message['role'] + '@HC@' + message['content']@TRIM@ + '@EOT@@AFTER@' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '@HO@assistant@HC@' }}
{%- endif %}
"""

_ASSISTANT_INFERENCE = """\
        {%- set content = message['content'] %}
        {#- Earlier turns lose their reasoning: keep what follows the last </think>. #}
        {%- if not loop.last and '@CLOSE@' in content %}
            {%- set content = content.split('@CLOSE@')[-1].lstrip() %}
        {%- endif %}
        {{- '@HO@assistant@HC@' + content@TRIM@ + '@EOT@@AFTER@' }}"""

# The end-of-turn token is inside the generation block so the model is trained to stop; the newline after
# ChatML's <|im_end|> is not (the form verified with TRL's assistant_only_loss).
_ASSISTANT_TRAINING = """\
        {{- '@HO@assistant@HC@' }}
        {%- generation %}
            {{- message['content']@TRIM@ + '@EOT@' }}
        {%- endgeneration %}"""


def _jinja_literal(text: str) -> str:
    # Body of a single-quoted Jinja string; `\\n` escapes keep the saved .jinja file readable.
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def reasoning_chat_template(fmt: str, training: bool = False) -> str:
    """Jinja chat template for `fmt` ("chatml" or "llama3") with the reasoning switch.

    ``training=False`` gives the inference variant (reasoning stripped from earlier assistant turns);
    ``training=True`` keeps all reasoning and marks assistant content with ``{% generation %}``.
    """
    if fmt not in _FORMATS:
        raise UnsupportedChatFormatError(
            f"found chat format {fmt!r}; supported chat formats are {' and '.join(SUPPORTED_FORMATS)}"
        )
    spec = _FORMATS[fmt]
    assistant = _ASSISTANT_INFERENCE
    if training:
        assistant = _ASSISTANT_TRAINING
        if spec.after_eot:
            assistant += "\n        {{- '@AFTER@' }}"
    template = _TEMPLATE.replace("@ASSISTANT@", assistant)
    replacements = {
        "@FMT@": fmt,
        "@VARIANT@": "training" if training else "inference",
        "@ON@": _jinja_literal(THINKING_ON),
        "@OFF@": _jinja_literal(THINKING_OFF),
        "@CLOSE@": _jinja_literal(THINK_CLOSE),
        "@HO@": _jinja_literal(spec.header_open),
        "@HC@": _jinja_literal(spec.header_close),
        "@EOT@": _jinja_literal(spec.eot),
        "@AFTER@": _jinja_literal(spec.after_eot),
        "@TRIM@": " | trim" if spec.trim else "",
    }
    # @BOS@ is a whole line: drop it rather than leave an empty line when the format has no bos.
    template = template.replace("@BOS@\n", spec.bos + "\n" if spec.bos else "")
    for key, value in replacements.items():
        template = template.replace(key, value)
    return template


def end_of_turn_token(fmt: str) -> str:
    """The token that ends a turn in `fmt` ("chatml": ``<|im_end|>``, "llama3": ``<|eot_id|>``); generation stops there."""
    if fmt not in _FORMATS:
        raise UnsupportedChatFormatError(
            f"found chat format {fmt!r}; supported chat formats are {' and '.join(SUPPORTED_FORMATS)}"
        )
    return _FORMATS[fmt].eot


def install_reasoning_templates(tokenizer: Any) -> None:
    """Replace the tokenizer's chat template with the reasoning templates for its format.

    Afterwards ``tokenizer.chat_template == {"default": <inference>, "training": <training>}``. transformers 5 saves
    the default as ``chat_template.jinja`` and the other as ``additional_chat_templates/training.jinja``, reloads both
    with ``from_pretrained``, and ``apply_chat_template(..., chat_template="training")`` selects the named one.
    Idempotent: the installed templates are detected as the same format again.

    TRL 1.16's SFTTrainer(assistant_only_loss=True) only looks at the default template (and raises for one without
    ``{% generation %}``), so training code must make the training variant the default, e.g.
    ``SFTConfig(chat_template_path=<saved dir>/additional_chat_templates/training.jinja)``.
    """
    current = tokenizer.chat_template
    if isinstance(current, dict):
        current = current.get("default")
    fmt = detect_chat_format(current)
    tokenizer.chat_template = {
        "default": reasoning_chat_template(fmt, training=False),
        TRAINING_TEMPLATE_NAME: reasoning_chat_template(fmt, training=True),
    }


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a generation into ``(reasoning, answer)``, both stripped.

    * ``<think>R</think>A`` (whitespace before ``<think>`` allowed) -> ``("R", "A")``; ``<think></think>A`` -> ``("", "A")``.
    * ``<think>R`` with no closing tag (truncated generation) -> ``("R", "")``.
    * ``R</think>A`` with no opening tag (the prompt pre-filled ``<think>``) -> ``("R", "A")``.
    * no tags -> ``(None, text.strip())``. A ``<think>`` that is not at the start (whitespace aside) is answer text,
      and so is a ``</think>`` that follows such a tag.

    The reasoning ends at the first ``</think>``; everything after it is the answer.
    """
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
        reasoning, close, answer = body.partition(THINK_CLOSE)
        return reasoning.strip(), answer.strip() if close else ""
    reasoning, close, answer = text.partition(THINK_CLOSE)
    # A close tag only ends pre-filled reasoning if no open tag came before it in the text itself.
    if close and THINK_OPEN not in reasoning:
        return reasoning.strip(), answer.strip()
    return None, text.strip()
