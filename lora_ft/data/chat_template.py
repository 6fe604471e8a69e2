"""Chat templates and the end-of-turn token: the reason fine-tuned chat models never stop talking.

A template ends each assistant turn with a token (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`, Mistral
`</s>`). If that token is not in the labels, or not among the EOS ids at inference, the model runs on
to max_new_tokens. The run's conversation (conversation.py) finds the token; here we check that every
trained assistant turn ends with it, and write the run's stop ids into its generation_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ft.data.conversation import Conversation, end_of_turn_token
from lora_ft.errors import DataError


def generation_config(model_config, conversation: Conversation):
    """The GenerationConfig saved with the adapter (and the merged model): stops on the run's stop ids, greedy."""
    from transformers import GenerationConfig  # lazy: ~1.8 s; data_check imports this module on train's 0.6 s refusal path

    base = GenerationConfig.from_model_config(model_config)
    base.eos_token_id = list(conversation.stop_ids) or base.eos_token_id
    base.pad_token_id = conversation.tokenizer.pad_token_id
    base.bos_token_id = conversation.tokenizer.bos_token_id
    base.do_sample = False
    base.max_new_tokens = 256
    for sampling_only in ("temperature", "top_p", "top_k"):
        setattr(base, sampling_only, None)
    return base


@dataclass(frozen=True)
class EndOfTurnReport:
    token: str | None
    turns: int  # trained assistant turns (contiguous trained spans)
    missing: int  # spans whose last trained token is not the end-of-turn token
    example: str | None  # where the first one is

    @property
    def ok(self) -> bool:
        return self.token is not None and self.missing == 0


def check_end_of_turn(encoded, tokenizer, train_on: str) -> EndOfTurnReport:
    """Every trained assistant span must end with the end-of-turn token, so the model learns to stop."""
    token = end_of_turn_token(tokenizer)
    if train_on == "all" or not getattr(tokenizer, "chat_template", None):
        return EndOfTurnReport(token, 0, 0, None)
    eot_id = tokenizer.convert_tokens_to_ids(token) if token else None
    turns = missing = 0
    example = None
    for item in encoded:
        if item.truncated:
            continue  # a cut row cannot end its last turn; data check reports truncation separately
        for last in _span_ends(item.labels):
            turns += 1
            if item.labels[last] != eot_id:
                missing += 1
                example = example or item.where
    return EndOfTurnReport(token, turns, missing, example)


def _span_ends(labels: list[int]) -> list[int]:
    ends = []
    for i, label in enumerate(labels):
        if label != -100 and (i + 1 == len(labels) or labels[i + 1] == -100):
            ends.append(i)
    return ends


def require_end_of_turn(report: EndOfTurnReport) -> None:
    if report.token is None and report.turns:
        raise DataError(
            "the chat template has no end-of-turn token after assistant messages, so a trained model cannot learn "
            "to stop; set model.chat_template to one that has (e.g. chatml)"
        )
    if report.missing:
        raise DataError(
            f"{report.missing} of {report.turns} assistant turns do not end with a trained {report.token} "
            f"(first: {report.example}); the model would not learn to stop. See it with: loraft data show CONFIG"
        )
