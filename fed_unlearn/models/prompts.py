"""Prompt formats: the chat template with a short system turn, or plain Q/A text."""

from __future__ import annotations

from fed_unlearn.data.qa import PromptFn

SYSTEM_PROMPT = "You are a helpful AI assistant."


def prompt_formatter(tokenizer: object) -> PromptFn:
    r"""Return the prompt format of a tokenizer.

    Models with a chat template (SmolLM2-Instruct) get a short system turn
    (:data:`SYSTEM_PROMPT`, instead of a long default one), the question as a user
    turn and the assistant generation prompt; others get
    ``Question: ...\\nAnswer: ``.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.

    Returns
    -------
    PromptFn
        Question -> prompt text.
    """
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": SYSTEM_PROMPT}]

        def chat(question: str) -> str:
            msgs = [{"role": "user", "content": question}]
            try:  # a short system turn replaces long default ones (fewer tokens)
                text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                    system + msgs, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # noqa: BLE001 - templates without a system role
                text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                    msgs, tokenize=False, add_generation_prompt=True
                )
            return str(text)

        return chat

    def plain(question: str) -> str:
        return f"Question: {question}\nAnswer: "

    return plain
