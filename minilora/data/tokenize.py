"""Records -> token ids with a trained-token mask, many records per call into the Rust tokenizer.

Plain formats tokenize their pieces separately (the prompt with the tokenizer's special tokens, the
response without, then eos), as a user's prompt and the model's answer are separate texts. A chat
conversation (and an alpaca record, when the tokenizer has a chat template) is rendered ONCE, with
each message's content replaced by a marker that is swapped back afterwards, so the rendering also
says where every content starts and ends. Its trained spans are the assistant turns: from where the
template's generation prompt ends (the content start) to where a rendering that stopped after that
turn would end (the content, then as much of the template's closing text as the full rendering
shares, e.g. `<|end|>\n`, and eos after the last turn). Tokens are found from character positions
in that one tokenization.

That shortcut holds for templates that insert contents verbatim and render a shorter history as a
prefix of a longer one. `ChatTemplateProbe` checks this once per tokenizer on a few conversations,
against the definition itself (render each prefix, compare); a template that fails it (or a record
whose text contains the markers) takes that definition per turn: slower, same result. The probe's
contents catch templates that trim or pad a content; one whose text depends on a content's value in
other ways (its length, a substring it cuts at, such as a reasoning model's `</think>`) is not caught,
and its contents are inserted verbatim where the template would have changed them.

Such a template's marked rendering depends on the messages' roles and other fields only, so an Encoder
renders each shape of conversation once (an alpaca file has one) and puts the contents in. Token
positions come from the tokenizer's character offsets, or, for byte-level BPE tokenizers, from the
tokens' own bytes (byte_tiling.py), which give the same positions without the offsets' cost.
"""

import re
from array import array
from dataclasses import dataclass

import numpy as np

from minilora.data.byte_tiling import ByteTiling, byte_offset, tokens_at
from minilora.data.examples import IGNORE_INDEX
from minilora.errors import UserError

# Used for alpaca records when the tokenizer has no chat template (the Stanford Alpaca layout).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# Private-use characters (never produced by tokenizers' special tokens) around a message index.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{MARK_OPEN}(\\d+){MARK_CLOSE}")
# Distinct conversation shapes whose renderings an Encoder keeps: real data has a handful (alpaca one,
# chat files a few turn patterns); the bound only caps memory on data where every shape is new.
MAX_SKELETONS = 4096
# Texts in a batch from which token positions come from the tokens' bytes (byte_tiling.py) rather than
# the offsets: building the table of a 128k vocabulary takes about as long as 1,000 texts' offsets.
TILING_MIN_TEXTS = 16


def alpaca_messages(record: dict) -> list[dict]:
    """An alpaca record as a user/assistant exchange: instruction, blank line, input (if any)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _skeleton(tokenizer, messages: list[dict]) -> list[str] | None:
    """The template's text around the contents of `messages`: [before message 0, between 0 and 1, ...,
    after the last], from one rendering with markers for contents; None if the template dropped,
    repeated or reordered a message."""
    marked = [{**m, "content": f"{MARK_OPEN}{i}{MARK_CLOSE}"} for i, m in enumerate(messages)]
    pieces = _MARK.split(_render(tokenizer, marked, False))  # text, index, text, index, ..., text
    if [int(i) for i in pieces[1::2]] != list(range(len(messages))):
        return None
    return pieces[0::2]


def _shape(messages: list[dict]) -> tuple:
    """What a marked rendering depends on: every message's fields but its content, in order, each with
    its type and repr (JSON's true equals 1 and -0.0 equals 0.0 as keys, not in a template; a list or
    dict field such as tool calls becomes a key too)."""
    return tuple(tuple((k, None, None) if k == "content" else (k, type(v), repr(v)) for k, v in m.items())
                 for m in messages)


def _marked_render(tokenizer, messages: list[dict], skeletons: dict | None = None):
    """(text, [(content start, end)] per message) from one rendering, or None if the markers clash.

    With `skeletons` (a dict kept by the caller), conversations of the same shape (the same roles and
    other fields) reuse one rendering: a template that inserts contents verbatim (ChatTemplateProbe)
    renders the text around them from the shape alone, and rendering costs most of a record's Python time.
    """
    if any(MARK_OPEN in m["content"] or MARK_CLOSE in m["content"] for m in messages):
        return None
    shape = _shape(messages) if skeletons is not None else None
    if shape is None:
        pieces = _skeleton(tokenizer, messages)
    elif shape in skeletons:
        pieces = skeletons[shape]
    else:
        pieces = _skeleton(tokenizer, messages)
        if len(skeletons) < MAX_SKELETONS:
            skeletons[shape] = pieces
    if pieces is None:
        return None
    text, spans = [pieces[0]], []
    pos = len(pieces[0])
    for message, after in zip(messages, pieces[1:], strict=True):
        spans.append((pos, pos + len(message["content"])))
        text += [message["content"], after]
        pos += len(message["content"]) + len(after)
    return "".join(text), spans


class ChatTemplateProbe:
    """Whether the one-rendering spans equal the per-turn definition for this template, and the text a
    rendering adds after a final assistant content (`tail`)."""

    CONVERSATIONS = (
        (("user", " q1\n"), ("assistant", "a1 ")),
        (("system", "s\n"), ("user", "q1"), ("assistant", "\na1"), ("user", " q2 "), ("assistant", "a2")),
        (("user", "q1"), ("assistant", "a1"), ("user", "q2")),
    )

    def __init__(self, tokenizer):
        self.tail: str | None = None
        try:
            self.regular = all(self._check([{"role": r, "content": c} for r, c in conv], tokenizer)
                               for conv in self.CONVERSATIONS)
        except Exception:  # a template that rejects a probe shape: use the per-turn definition
            self.regular = False

    def _check(self, messages: list[dict], tokenizer) -> bool:
        full = _render(tokenizer, messages, False)
        marked = _marked_render(tokenizer, messages)
        if marked is None or marked[0] != full:
            return False
        for i, (start, end) in enumerate(marked[1]):
            if messages[i]["role"] != "assistant":
                continue
            if _render(tokenizer, messages[:i], True) != full[:start]:
                return False
            upto = _render(tokenizer, messages[: i + 1], False)
            if upto[:end] != full[:end] or self.tail not in (None, upto[end:]):
                return False
            self.tail = upto[end:]
        return True


@dataclass
class Encoded:
    """Records' tokens back to back: ids (N,) int64, trained (N,) bool, and each record's count (n,) int64."""

    ids: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, pairs: list[tuple[np.ndarray, np.ndarray]]) -> "Encoded":
        return cls(np.concatenate([np.zeros(0, np.int64)] + [ids for ids, _ in pairs]),
                   np.concatenate([np.zeros(0, bool)] + [trained for _, trained in pairs]),
                   np.array([len(ids) for ids, _ in pairs], dtype=np.int64))

    def split(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per record: (ids (T,), trained (T,)), views into the batch's arrays."""
        if not len(self.lengths):
            return []
        cuts = np.cumsum(self.lengths)[:-1]
        return list(zip(np.split(self.ids, cuts), np.split(self.trained, cuts), strict=True))


def _flat_ids(encodings, eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the encodings' ids back to back (N,) int64, ids per encoding (n,)); with `eos`, each encoding's ids
    end with it (added where they do not already). One array for a whole batch: a numpy array per record
    costs more than its tokens do."""
    # Token ids are unsigned 32-bit in the Rust tokenizer (and any vocabulary fits them); "I" extends fastest.
    flat, lengths = array("I"), []
    for enc in encodings:
        ids = enc.ids
        flat.extend(ids)
        n = len(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            flat.append(eos)
            n += 1
        lengths.append(n)
    ids = np.frombuffer(flat, dtype=np.uint32).astype(np.int64) if flat else np.zeros(0, np.int64)
    return ids, np.array(lengths, dtype=np.int64)


def _prompt_then_response(prompts: tuple[np.ndarray, np.ndarray], responses: tuple[np.ndarray, np.ndarray]) -> Encoded:
    """Each record's prompt ids, then its response ids (trained), from the two flat batches (ids, lengths)."""
    (p_ids, p_len), (r_ids, r_len) = prompts, responses
    lengths = p_len + r_len
    starts = np.cumsum(lengths) - lengths  # (n,) where each record starts in the output
    ids, trained = np.empty(int(lengths.sum()), np.int64), np.zeros(int(lengths.sum()), bool)
    # Token j of the prompts goes to j + (the record's output start - its start among the prompts).
    p_dest = np.arange(len(p_ids)) + np.repeat(starts - (np.cumsum(p_len) - p_len), p_len)
    r_dest = np.arange(len(r_ids)) + np.repeat(starts + p_len - (np.cumsum(r_len) - r_len), r_len)
    ids[p_dest], ids[r_dest], trained[r_dest] = p_ids, r_ids, True
    return Encoded(ids, trained, lengths)


class Encoder:
    """Tokenizes records of one format for one tokenizer: `encode(records)` -> Encoded."""

    def __init__(self, tokenizer, fmt: str):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.eos = tokenizer.eos_token_id
        self.chat = fmt == "chat" or (fmt == "alpaca" and has_chat_template(tokenizer))
        if fmt == "chat" and not has_chat_template(tokenizer):
            raise UserError("chat-format data needs a tokenizer with a chat template, and this one has none")
        self.backend = _plain_backend(tokenizer)
        self.probe = ChatTemplateProbe(tokenizer) if self.chat and self.backend is not None else None
        self.skeletons: dict = {}  # conversation shape -> the template's text around the contents
        self.tiling: ByteTiling | bool | None = None  # built on the first large batch; False: not byte-level

    def _encode(self, texts: list[str], special: bool, offsets: bool = False) -> list:
        """Encodings as the tokenizer's __call__ would produce them: `.ids`, and `.char_to_token` with
        `offsets` (which costs the Rust tokenizer about half as much again)."""
        if self.backend is not None:
            if offsets or not hasattr(self.backend, "encode_batch_fast"):
                return self.backend.encode_batch(texts, add_special_tokens=special)
            return self.backend.encode_batch_fast(texts, add_special_tokens=special)
        return [_IdsOnly(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    def encode(self, records: list[dict]) -> Encoded:
        """The records' ids and trained-token masks back to back, untruncated."""
        if self.chat:
            return self._encode_chats([r["messages"] if self.fmt == "chat" else alpaca_messages(r) for r in records])
        if self.fmt == "text":
            ids, lengths = _flat_ids(self._encode([r["text"] for r in records], special=True), self.eos)
            return Encoded(ids, np.ones(len(ids), dtype=bool), lengths)
        if self.fmt == "alpaca":
            prompts = [(PLAIN_PROMPT_WITH_INPUT if r.get("input") else PLAIN_PROMPT).format(**r) for r in records]
            responses = [r["output"] for r in records]
        elif self.fmt == "prompt_completion":
            prompts, responses = [r["prompt"] for r in records], [r["completion"] for r in records]
        else:
            raise ValueError(f"unknown data format {self.fmt!r}")
        return _prompt_then_response(_flat_ids(self._encode(prompts, True)),
                                     _flat_ids(self._encode(responses, False), self.eos))

    def _encode_chats(self, conversations: list[list[dict]]) -> Encoded:
        rendered = {}
        if self.probe is not None and self.probe.regular:
            for k, messages in enumerate(conversations):
                marked = _marked_render(self.tokenizer, messages, self.skeletons)
                if marked is not None:
                    rendered[k] = marked
        keys = list(rendered)
        if not keys:
            return Encoded.of([self._per_turn_spans(messages) for messages in conversations])
        one = self._one_rendering_spans([conversations[k] for k in keys], [rendered[k] for k in keys])
        if len(keys) == len(conversations):
            return one
        done = dict(zip(keys, one.split(), strict=True))
        return Encoded.of([done[k] if k in done else self._per_turn_spans(messages)
                           for k, messages in enumerate(conversations)])

    def _one_rendering_spans(self, conversations: list[list[dict]], rendered: list[tuple[str, list]]) -> Encoded:
        """Tokens of each one-rendering text, trained from each assistant content's start to its end plus
        as much of the template's closing text (`probe.tail`) as follows it."""
        texts = [text for text, _ in rendered]
        turns = []  # (record, first character, character after the end) of every assistant turn
        for k, (messages, (text, contents)) in enumerate(zip(conversations, rendered, strict=True)):
            for message, (start, end) in zip(messages, contents, strict=True):
                if message["role"] == "assistant":
                    end += _common_prefix(text[end : end + len(self.probe.tail)], self.probe.tail)
                    turns.append((k, start, end))
        ids, lengths, firsts, stops = self._locate(texts, turns)
        # Token positions count over the whole batch: a record's turns start at or after its first token, and
        # every stop of the records before it is at or before that token, so `pos` needs no reset per record.
        marks = np.zeros(len(ids) + 1, dtype=np.int64)
        pos = 0
        for first, stop in zip(firsts.tolist(), stops.tolist(), strict=True):
            first = max(first, pos)
            if stop <= first:
                continue
            marks[first] += 1
            marks[stop] -= 1
            pos = stop
        return Encoded(ids, np.cumsum(marks[:-1]) > 0, lengths)

    def _locate(self, texts: list[str], turns: list[tuple[int, int, int]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(the texts' ids back to back (N,), ids per text (n,), and for every turn (record, a, b) the first
        token that holds character a and the one that holds b, counted over the batch, a text's end
        standing for its last token + 1): from the tokens' bytes where a byte-level tokenizer's tokens
        tile the texts (byte_tiling.py), else from the tokenizer's offsets. A batch of a few texts always
        takes the offsets (not worth a table)."""
        if self.tiling is None and len(texts) >= TILING_MIN_TEXTS and self.backend is not None:
            self.tiling = ByteTiling.of(self.backend) or False
        turn_text = np.array([k for k, _, _ in turns], dtype=np.int64)  # (turns,) the text each turn is in
        if self.tiling:
            ids, lengths = _flat_ids(self._encode(texts, False))
            ends = self.tiling.locate(texts, ids, lengths)
            if ends is not None:
                token_starts = np.cumsum(lengths) - lengths
                byte_starts = np.concatenate((np.zeros(1, np.int64), ends))[token_starts]  # (n,) of each text
                positions = np.array([(byte_offset(texts[k], a), byte_offset(texts[k], b)) for k, a, b in turns],
                                     dtype=np.int64).reshape(-1, 2)  # (turns, 2) in each text's bytes
                found = tokens_at(ends, positions + byte_starts[turn_text, None])  # (turns, 2)
                # A text's end finds its last token + 1 already (every token holds a byte); kept as a bound.
                found = np.minimum(found, (token_starts + lengths)[turn_text, None])
                return ids, lengths, found[:, 0], found[:, 1]
        encodings = self._encode(texts, False, offsets=True)
        ids, lengths = _flat_ids(encodings)
        token_starts = np.cumsum(lengths) - lengths
        found = [[token_starts[k] + _token_at(encodings[k], c, len(texts[k]), int(lengths[k])) for c in (a, b)]
                 for k, a, b in turns]
        found = np.array(found, dtype=np.int64).reshape(-1, 2)
        return ids, lengths, found[:, 0], found[:, 1]

    def _per_turn_spans(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """The definition: a turn's span starts where `messages[:i]` + generation prompt ends and stops
        where `messages[:i+1]` ends, both measured as common token prefixes with the full rendering
        (templates may append tokens only after the final turn, and BPE may merge across a boundary)."""

        def render(msgs, gen):
            # The template writes bos itself; letting the tokenizer add it again would double it.
            return self._encode([_render(self.tokenizer, msgs, gen)], special=False)[0].ids

        full = render(messages, False)
        trained = np.zeros(len(full), dtype=bool)
        pos = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant" or i == 0:  # no history: nothing to render a prompt from
                continue
            prefix = render(messages[:i], True)
            start = _common_prefix(prefix, full)
            end = _common_prefix(render(messages[: i + 1], False), full)
            # A divergence of more than one boundary token means the template re-renders history
            # differently once a turn is added; the span is then unknown and the turn is left untrained.
            if start < len(prefix) - 1 or end <= max(start, pos):
                continue
            trained[max(start, pos) : end] = True
            pos = end
        return np.array(full, dtype=np.int64), trained


class _IdsOnly:
    """A slow tokenizer's ids where a Rust encoding is expected (only `.ids` is read from it)."""

    def __init__(self, ids):
        self.ids = ids


def _token_at(enc, char: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token that ends after character `char` (n_tokens past the end)."""
    while char < n_chars:
        token = enc.char_to_token(char)
        if token is not None:
            return token
        char += 1
    return n_tokens


def _plain_backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend set up as `tokenizer(...)` sets it (no truncation,
    no padding, special tokens split or not as configured); None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return copy


def tokenize_record(record: dict, fmt: str, tokenizer, seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels copy the ids on trained tokens, IGNORE_INDEX elsewhere.

    Labels are aligned with input_ids (not shifted); the loss shifts them. Cut to `seq_len` tokens.
    """
    encoded = Encoder(tokenizer, fmt).encode([record])
    ids, trained = encoded.ids, encoded.trained
    labels = np.where(trained, ids, IGNORE_INDEX)
    return ids[:seq_len].tolist(), labels[:seq_len].tolist(), len(ids) > seq_len


def prompt_ids(record: dict, fmt: str, tokenizer) -> list[int]:
    """The tokens a model is given to generate the record's (last) response, rendered as in training."""
    if fmt == "text":
        raise ValueError("a text record has no prompt")
    encoded = Encoder(tokenizer, fmt).encode([record])
    ids, trained = encoded.ids, encoded.trained
    starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
    return ids[: starts[-1]].tolist()
