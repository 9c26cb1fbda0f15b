"""The chat template: how a conversation becomes tokens, which of them a fine-tune learns, and back.

    <|endoftext|><|user|>Who speaks first?<|end|><|assistant|>ROMEO.<|end|><|user|>...<|end|><|assistant|>

- A conversation starts with <|endoftext|>, the boundary the base model saw between its documents.
- Each turn is its role's token, its content (byte-level BPE, as any text) and <|end|>.
- A `system` message (first, at most one) is merged into the first user turn: "<system>\n\n<user>".
- The loss mask is 1 on the assistant's content tokens and on the <|end|> that closes them (the model
  learns to answer and to stop), 0 on everything else (the prompt is given, not learned).
- Generation gives the conversation so far and <|assistant|>, and stops at <|end|>.

The same template is written in Jinja (CHAT_TEMPLATE) into an exported tokenizer_config.json, so that
transformers' `apply_chat_template` renders the same tokens: the chat tokens are special tokens of the
tokenizer (reserved when it is trained, `tokenizer.special_tokens`), so both split the text at them and
encode the pieces between alike. A content that spells a chat token would tokenize differently there:
such a conversation is refused (`conversation_problem`).
"""

from __future__ import annotations

import dataclasses

from tokenizers import Tokenizer

from llm_core.data.tokenizer import CHAT_TOKENS, EOT

USER, ASSISTANT, END = CHAT_TOKENS  # reserved by every tokenizer trained with the default profile
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER + "' + ns.system + message['content'] + '" + END + "' -}}{%- set ns.system = '' -%}"
    "{%- else -%}{{- '" + ASSISTANT + "' + message['content'] + '" + END + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"
)


def missing_chat_tokens(tokenizer: Tokenizer) -> list[str]:
    """The chat tokens (and <|endoftext|>) a tokenizer does not have as single tokens."""
    return [t for t in (EOT, *CHAT_TOKENS) if tokenizer.token_to_id(t) is None]


def turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, content) of the user and assistant turns, the system message merged into the first user turn."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
    if system and out:
        out[0] = (out[0][0], f"{system[0]}\n\n{out[0][1]}")
    return out


def conversation_problem(messages, prompt: bool = False) -> str | None:
    """Why `messages` cannot be a training conversation (the quarantine's reason), or None. With `prompt`,
    the conversation is one to answer (a chat request): it must end with the user's turn instead."""
    if not isinstance(messages, list) or not messages:
        return "no messages: expected {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            return f"message {i} is not {{\"role\": ..., \"content\": ...}}"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"message {i} ({m['role']}) has empty content"
        if any(token in m["content"] for token in (EOT, *CHAT_TOKENS)):
            return f"message {i} ({m['role']}) spells a chat token in its content"
        if m["role"] == "system" and i != 0:
            return f"message {i} is a system message; only the first message may be"
    roles = [role for role, _ in turns(messages)]
    if not roles:
        return "no user or assistant turn"
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"roles must alternate user, assistant, user, ...: turn {i} is {role}"
    if prompt and roles[-1] != "user":
        return "the last turn is the assistant's: nothing to answer (end with a user message)"
    if not prompt and roles[-1] != "assistant":
        return "the last turn is the user's: nothing for the assistant to learn"
    return None


@dataclasses.dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where ids[i] is a token the fine-tune learns (as a target)
    assistant_bytes: int  # UTF-8 bytes of the assistant's content: bits per byte's denominator


def _special(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token (its chat tokens: tokenizer.special_tokens)")
    return token_id


def render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """The tokens of a conversation and its loss mask; with `add_generation_prompt`, ending with
    <|assistant|> for the model to answer. Contents are encoded as text (no special tokens inside)."""
    tokenizer.encode_special_tokens = True
    role_ids = {"user": _special(tokenizer, USER), "assistant": _special(tokenizer, ASSISTANT)}
    end = _special(tokenizer, END)
    ids, mask, assistant_bytes = [_special(tokenizer, EOT)], [0], 0
    pieces = turns(messages)
    encoded = tokenizer.encode_batch([content for _, content in pieces], add_special_tokens=False)
    for (role, content), encoding in zip(pieces, encoded):
        learned = int(role == "assistant")
        ids += [role_ids[role], *encoding.ids, end]
        mask += [0] + [learned] * (len(encoding.ids) + 1)
        assistant_bytes += len(content.encode()) if learned else 0
    if add_generation_prompt:
        ids.append(role_ids["assistant"])
        mask.append(0)
    return Rendered(ids, mask, assistant_bytes)


def parse(tokenizer: Tokenizer, ids: list[int]) -> list[dict]:
    """The conversation that `render` made `ids` from (the system message stays merged in the first turn)."""
    role_of = {_special(tokenizer, USER): "user", _special(tokenizer, ASSISTANT): "assistant"}
    end, eot = _special(tokenizer, END), _special(tokenizer, EOT)
    messages, role, content = [], None, []
    for token in ids:
        if token in role_of:
            role, content = role_of[token], []
        elif token == end and role is not None:
            messages.append({"role": role, "content": tokenizer.decode(content, skip_special_tokens=False)})
            role = None
        elif token != eot and role is not None:
            content.append(token)
    return messages
