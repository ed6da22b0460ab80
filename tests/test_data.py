"""Reading, validating and tokenizing JSONL data: exact label masks per format, errors with line numbers."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from minilora.builtin import build_tokenizer
from minilora.data.dataset import load_dataset, split_eval
from minilora.data.examples import IGNORE_INDEX
from minilora.data.records import read_records
from minilora.data.tokenize import prompt_ids, tokenize_record
from minilora.errors import DataError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    # The same vocabulary with no chat template: alpaca falls back to the plain "### ..." layout.
    t = build_tokenizer()
    t.chat_template = None
    return t


def b(text: str) -> list[int]:
    """Expected ids of plain text under the builtin byte tokenizer (id = 3 + byte), independent of it."""
    return [3 + x for x in text.encode("utf-8")]


BOS, EOS, ASSISTANT, SYSTEM, END, USER = 1, 2, 260, 261, 262, 263


def write(tmp_path, lines) -> Path:
    """Write raw bytes, or one line per item (strings as they are, anything else as JSON)."""
    path = tmp_path / "data.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_records(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- label masks ---------------------------------------------------------------------------------


def test_alpaca_with_chat_template_trains_on_the_reply_only(tok):
    record = {"instruction": "Rev", "input": "ab", "output": "ba"}
    ids, labels, truncated = tokenize_record(record, "alpaca", tok, seq_len=512)
    prompt = [BOS, USER] + b("\nRev\n\nab") + [END] + b("\n") + [ASSISTANT] + b("\n")
    reply = b("ba") + [END] + b("\n") + [EOS]
    assert ids == prompt + reply
    assert labels == [X] * len(prompt) + reply
    assert not truncated


def test_alpaca_without_input_has_no_blank_line(tok):
    ids, labels, _ = tokenize_record({"instruction": "Hi", "output": "yo", "input": ""}, "alpaca", tok, 512)
    prompt = [BOS, USER] + b("\nHi") + [END] + b("\n") + [ASSISTANT] + b("\n")
    assert ids == prompt + b("yo") + [END] + b("\n") + [EOS]
    assert labels[: len(prompt)] == [X] * len(prompt)


def test_alpaca_without_template_uses_plain_prompt_and_appends_eos(plain_tok):
    record = {"instruction": "Rev", "input": "ab", "output": "ba"}
    ids, labels, _ = tokenize_record(record, "alpaca", plain_tok, 512)
    prompt = [BOS] + b("### Instruction:\nRev\n\n### Input:\nab\n\n### Response:\n")
    assert ids == prompt + b("ba") + [EOS]
    assert labels == [X] * len(prompt) + b("ba") + [EOS]
    ids, _, _ = tokenize_record({"instruction": "Rev", "input": None, "output": "x"}, "alpaca", plain_tok, 512)
    assert ids == [BOS] + b("### Instruction:\nRev\n\n### Response:\n") + b("x") + [EOS]


def test_chat_trains_every_assistant_turn_and_eos_only_at_the_end(tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    ids, labels, _ = tokenize_record({"messages": messages}, "chat", tok, 512)
    p1 = [BOS, SYSTEM] + b("\nS") + [END] + b("\n") + [USER] + b("\nu1") + [END] + b("\n") + [ASSISTANT] + b("\n")
    r1 = b("a1") + [END] + b("\n")
    p2 = [USER] + b("\nu2") + [END] + b("\n") + [ASSISTANT] + b("\n")
    r2 = b("a2") + [END] + b("\n") + [EOS]
    assert ids == p1 + r1 + p2 + r2
    assert labels == [X] * len(p1) + r1 + [X] * len(p2) + r2


def test_chat_trailing_user_turn_is_context_only(tok):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "more?"},
    ]
    ids, labels, _ = tokenize_record({"messages": messages}, "chat", tok, 512)
    trained = [t for t, label in zip(ids, labels, strict=True) if label != X]
    assert trained == b("a") + [END] + b("\n")


def test_chat_template_that_rewrites_history_trains_nothing_rather_than_prompts(tok):
    odd = build_tokenizer()
    # Renders the turn count first, so a shorter prefix is never a prefix of the full text.
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids, labels, _ = tokenize_record({"messages": messages}, "chat", odd, 512)
    assert ids == b("2qa")
    assert labels == [X] * 3


def test_prompt_completion_masks_prompt(tok):
    ids, labels, _ = tokenize_record({"prompt": "Q:", "completion": " A"}, "prompt_completion", tok, 512)
    assert ids == [BOS] + b("Q:") + b(" A") + [EOS]
    assert labels == [X] * 3 + b(" A") + [EOS]


def test_text_trains_on_everything(tok):
    ids, labels, _ = tokenize_record({"text": "héllo"}, "text", tok, 512)
    assert ids == [BOS] + b("héllo") + [EOS]
    assert labels == ids


def test_truncation_cuts_ids_and_labels_together(tok):
    ids, labels, truncated = tokenize_record({"prompt": "abc", "completion": "de"}, "prompt_completion", tok, 5)
    assert ids == [BOS] + b("abcd")
    assert labels == [X] * 4 + b("d")
    assert truncated
    assert not tokenize_record({"prompt": "abc", "completion": "de"}, "prompt_completion", tok, 7)[2]


def test_prompt_ids_are_the_training_prefix(tok, plain_tok):
    record = {"instruction": "Rev", "input": "ab", "output": "ba"}
    for t in (tok, plain_tok):
        ids, labels, _ = tokenize_record(record, "alpaca", t, 512)
        first_target = next(i for i, label in enumerate(labels) if label != X)
        assert prompt_ids(record, "alpaca", t) == ids[:first_target]


# --- datasets ------------------------------------------------------------------------------------


def test_load_dataset_counts_truncated_and_dropped(tmp_path, tok):
    path = write(
        tmp_path,
        [
            {"prompt": "a", "completion": "b"},  # 4 tokens: kept whole
            {"prompt": "a", "completion": "bcdefgh"},  # 10 tokens: truncated, keeps targets
            {"prompt": "abcdefghij", "completion": "k"},  # prompt fills seq_len: dropped
            "",
        ],
    )
    ds = load_dataset(path, tok, seq_len=6)
    assert ds.fmt == "prompt_completion"
    assert [e.line for e in ds.examples] == [1, 2]
    assert (ds.n_lines, ds.n_truncated, ds.n_dropped) == (3, 1, 1)
    assert ds.n_tokens == 4 + 6
    assert ds.n_target_tokens == 2 + 4  # "b</s>" and "bcde" (labels[0] is never a target)
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.skipped == []


def test_load_dataset_fails_when_every_prompt_is_too_long(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "abcdefghij", "completion": "k"}])
    with pytest.raises(DataError, match=r"data.jsonl: no example has a response token within --seq-len 4"):
        load_dataset(path, tok, seq_len=4)


def test_chat_data_needs_a_chat_template(tmp_path, plain_tok):
    path = write(tmp_path, [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        load_dataset(path, plain_tok, 64)


@pytest.mark.parametrize(
    ("name", "fmt", "n"),
    [("alpaca", "alpaca", 3), ("chat", "chat", 2), ("prompt_completion", "prompt_completion", 2), ("text", "text", 2)],
)
def test_sample_files_load(tok, name, fmt, n):
    ds = load_dataset(EXAMPLES / "samples" / f"{name}.jsonl", tok, 256)
    assert (ds.fmt, len(ds.examples), ds.n_truncated) == (fmt, n, 0)


def test_demo_data_is_what_the_generator_writes(tok):
    spec = importlib.util.spec_from_file_location("make_demo_data", EXAMPLES / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo = EXAMPLES / "demo.jsonl"
    assert demo.read_text(encoding="utf-8") == module.render(module.make_records())
    ds = load_dataset(demo, tok, 128)
    assert (ds.fmt, len(ds.examples), ds.n_truncated) == ("alpaca", 512, 0)
    assert max(len(e.input_ids) for e in ds.examples) < 80


def test_split_eval_is_seeded_disjoint_and_keeps_order():
    items = list(range(20))
    train, ev = split_eval(items, 0.25, seed=3)
    assert len(ev) == 5 and sorted(train + ev) == items
    assert train == sorted(train) and ev == sorted(ev)
    assert split_eval(items, 0.25, seed=3) == (train, ev)
    assert split_eval(items, 0.25, seed=4)[1] != ev
    assert len(split_eval(items, 0.01, seed=0)[1]) == 1  # rounds to 0, but at least one
    assert split_eval(items, 0.0, seed=0) == (items, [])
    assert split_eval([7], 0.5, seed=0) == ([7], [])
    assert len(split_eval([1, 2], 0.9, seed=0)[0]) == 1  # train keeps one


# --- errors --------------------------------------------------------------------------------------


def test_missing_empty_and_blank_files(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    assert error_of(write(tmp_path, b"")).endswith("data.jsonl: the file is empty")
    assert error_of(write(tmp_path, b"\n  \n\t\n")).endswith("data.jsonl: the file has only blank lines")
    assert error_of(tmp_path).endswith("is a directory, expected a JSONL file")


def test_not_utf8_names_the_line(tmp_path):
    good = json.dumps({"text": "ok"}).encode()
    path = write(tmp_path, good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n')
    assert f"{path}:3: not UTF-8: byte 0xe9" in error_of(path)


def test_bom_crlf_and_blank_lines_are_accepted_with_true_line_numbers(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    records, skipped = read_records(path)
    assert records == [(1, {"text": "a"}), (3, {"text": "b"})]
    assert skipped == []


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text": "a",}', "expected JSON: Expecting property name enclosed in double quotes (column 14)"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('"just a string"', "expected a JSON object, got a string"),
        ('{"foo": 1, "bar": 2}', "no known fields (got: bar, foo); accepted formats: alpaca {instruction, input"),
        ('{"instruction": "x", "output": 5}', "field 'output' must be a string, got int"),
        ('{"instruction": "x", "input": [], "output": "y"}', "field 'input' must be a string, got list"),
        ('{"instruction": "x"}', "alpaca record is missing field 'output'"),
        ('{"prompt": "x"}', "prompt_completion record is missing field 'completion'"),
        ('{"text": "x", "output": "y"}', "fields of several formats (alpaca, text)"),
        ('{"messages": "hi"}', "field 'messages' must be a list, got string"),
        ('{"messages": ["hi"]}', "messages[0] must be a JSON object, got a string"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', 'messages[0]: role "bot" is not one of user, assistant'),
        ('{"messages": [{"content": "x"}]}', "messages[0] is missing field 'role'"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
            "messages[1]: field 'content' must be a string, got null",
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message in 'messages'"),
        ('{"messages": []}', "no assistant message in 'messages'"),
    ],
)
def test_bad_line_is_reported_with_its_line_number(tmp_path, line, fragment):
    path = write(tmp_path, ["", line])  # a leading blank line: the bad record is on line 2
    message = error_of(path)
    assert message.startswith(f"{path}:2: ")
    assert fragment in message


def test_mixed_formats_name_both_lines(tmp_path):
    alpaca = {"instruction": "i", "output": "o"}
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, [alpaca] * 16 + [chat])
    assert error_of(path) == (
        f"{path}:17: line 17 is chat format but the file started as alpaca (line 1); use one format per file"
    )


def test_skip_bad_lines_collects_line_problems(tmp_path, tok):
    path = write(tmp_path, ["not json", {"text": "a"}, {"text": 3}, {"prompt": "p", "completion": "c"}, {"text": "b"}])
    records, skipped = read_records(path, skip_bad_lines=True)
    assert records == [(2, {"text": "a"}), (5, {"text": "b"})]
    assert [line for line, _ in skipped] == [1, 3, 4]
    assert skipped[0][1].startswith("expected JSON")
    assert skipped[1][1] == "field 'text' must be a string, got int"
    assert skipped[2][1].startswith("line 4 is prompt_completion format but the file started as text (line 2)")
    ds = load_dataset(path, tok, 64, skip_bad_lines=True)
    assert ([e.line for e in ds.examples], ds.n_lines, ds.skipped) == ([2, 5], 5, skipped)


def test_skip_bad_lines_still_fails_on_file_problems(tmp_path):
    assert error_of(write(tmp_path, b""), skip_bad_lines=True).endswith("the file is empty")
    message = error_of(write(tmp_path, ["{", "[]"]), skip_bad_lines=True)
    assert message.startswith(f"{tmp_path / 'data.jsonl'}: no valid line: all 2 were skipped (first, line 1:")
