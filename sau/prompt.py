"""The one prompt format shared by training, unlearning and evaluation.

A QA row is rendered as ``format_prompt(question)`` followed by ``format_answer(answer)``;
losses and answer probabilities are taken over the answer tokens only.

`TemplateArgs` and `encode_chat` are the other format, open-unlearning's: the model's chat
template (or its user/assistant tags) around the question, the answer and an EOS, all
scored. Only `sau.lab.eval.open_unlearning` uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    """The text the model is conditioned on for one question."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_answer(answer: str) -> str:
    """The continuation scored or generated after the prompt (leading space, no EOS)."""
    return " " + answer.strip()


@dataclass(frozen=True)
class TemplateArgs:
    """open-unlearning's ``template_args`` (its configs/model/*.yaml): how a QA row becomes
    a chat turn for a model fine-tuned with one.

    apply_chat_template: True: the tokenizer's chat template (system prompt, then the user
        question and the assistant answer); False: the tags below; None: the chat template
        when the tokenizer has one, else the tags.
    system_prompt: the system message of the chat-template path (None: none).
    system_prompt_with_special_tokens: text put before the first user tag on the tags path.
    user_start_tag, user_end_tag, asst_start_tag, asst_end_tag: the tags path's wrapping;
        the defaults are open-unlearning's for base models (Llama-2-7b-hf, phi-1_5).
    date_string: passed to the chat template as ``date_string`` (Llama-3's templates).
    """

    apply_chat_template: bool | None = None
    system_prompt: str | None = None
    system_prompt_with_special_tokens: str | None = None
    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer: "
    asst_end_tag: str = "\n\n"
    date_string: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping) -> TemplateArgs:
        """From open-unlearning's ``template_args`` mapping (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(values) - known)
        if extra:
            raise ValueError(f"unknown template_args key(s): {', '.join(extra)}")
        return cls(**dict(values))

    def uses_chat_template(self, tok) -> bool:
        """Whether `tok`'s chat template renders the rows (see `apply_chat_template`)."""
        if self.apply_chat_template is None:
            return getattr(tok, "chat_template", None) is not None
        return self.apply_chat_template


def _user_chat(question: str, template: TemplateArgs) -> list[dict]:
    # open-unlearning adds the system message only when the system prompt is non-empty.
    chat = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    return chat + [{"role": "user", "content": question}]


def _chat_ids(tok, chat: list, template: TemplateArgs, *, generation: bool) -> list[int]:
    date = {} if template.date_string is None else {"date_string": template.date_string}
    ids = tok.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=generation, return_dict=False, **date
    )
    return list(ids)


def encode_chat(tok, question: str, answer: str, template: TemplateArgs) -> tuple[list, int]:
    """Token ids of one QA row as open-unlearning builds them (its preprocess_chat_instance,
    single turn, no truncation): ``(ids, n_prompt)``.

    ids: list[int], the whole turn, EOS appended unless it already ends with EOS; every id
    from position n_prompt on is scored (the answer, the template's closing tokens and the
    EOS). The prompt and the full turn are tokenized separately, as open-unlearning does,
    and the answer starts at ``len(prompt ids)`` even where the two tokenizations disagree.
    Question and answer are used as given (no strip).
    """
    if template.uses_chat_template(tok):
        chat = _user_chat(question, template)
        prompt_ids = _chat_ids(tok, chat, template, generation=True)
        turn = chat + [{"role": "assistant", "content": answer}]
        ids = _chat_ids(tok, turn, template, generation=False)
    else:
        prompt = chat_prompt_text(question, template)
        prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        ids = list(tok(prompt + answer, add_special_tokens=True)["input_ids"])
    if ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
    return ids, len(prompt_ids)


def chat_prompt_text(question: str, template: TemplateArgs) -> str:
    """The tags path's prompt text: system text, user tags around the question, then the
    assistant start tag (the answer follows directly, no space added)."""
    return (
        (template.system_prompt_with_special_tokens or "")
        + template.user_start_tag
        + question
        + template.user_end_tag
        + template.asst_start_tag
    )


def chat_prompt_ids(tok, question: str, template: TemplateArgs) -> list[int]:
    """Token ids a generation starts from: `encode_chat`'s prompt part, list[int]."""
    if template.uses_chat_template(tok):
        return _chat_ids(tok, _user_chat(question, template), template, generation=True)
    return list(tok(chat_prompt_text(question, template), add_special_tokens=True)["input_ids"])
