import json

import pytest

from posttrain.data.formats import validate
from posttrain.data.io import DataError, read_rows
from posttrain.data.tokenize import encode_messages, encode_prompt_completion, encode_rows

ROWS = [{"prompt": "1+1=", "completion": "2", "answer": "2"}, {"prompt": "2+2=", "completion": "4", "answer": "4"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_every_reader_gives_the_same_rows(tmp_path, fmt):
    if fmt == "jsonl":
        path = _jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("prompt,completion,answer\n1+1=,2,2\n2+2=,4,4\n")
    else:
        import datasets

        path = tmp_path / "ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    rows = read_rows(str(path))
    assert rows.rows == ROWS
    validate(rows, "sft")


def test_jsonl_errors_name_file_line_and_column(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [ROWS[0], {"prompt": "3+3="}])
    with pytest.raises(DataError, match=r"t.jsonl:2: missing column 'completion'"):
        validate(read_rows(str(p)), "sft")
    p = _jsonl(tmp_path / "t.jsonl", [ROWS[0], {"prompt": "3+3=", "completion": "  "}])
    with pytest.raises(DataError, match=r"t.jsonl:2: column 'completion' is empty"):
        validate(read_rows(str(p)), "sft")
    p = _jsonl(tmp_path / "t.jsonl", [{"prompt": 5, "completion": "x"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: column 'prompt' must be a string or a list of messages, got int"):
        validate(read_rows(str(p)), "sft")
    p = _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: missing column 'rejected'"):
        validate(read_rows(str(p)), "preference")
    p = _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "a", "label": "yes"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: column 'label' must be true or false"):
        validate(read_rows(str(p)), "unpaired")
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: invalid JSON"):
        read_rows(str(p))
    p.write_text("\n\n")
    with pytest.raises(DataError, match=r"t.jsonl: the dataset is empty"):
        read_rows(str(p))
    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_messages_validation_names_message(tmp_path):
    p = _jsonl(
        tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}]
    )
    with pytest.raises(DataError, match=r"m.jsonl:1: column 'messages', message 1: unknown role 'bot'"):
        validate(read_rows(str(p)), "sft")
    p = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"m.jsonl:1: column 'messages' has no non-empty assistant message"):
        validate(read_rows(str(p)), "sft")


def test_completion_only_mask(char_tok):
    ex = encode_prompt_completion(char_tok, "12+3=", "15")
    assert len(ex) == 5 + 2 + 1  # prompt, completion, EOS
    assert ex.loss_mask == (0, 0, 0, 0, 0, 1, 1, 1)
    assert ex.input_ids[-1] == char_tok.eos_token_id


def test_assistant_only_mask_covers_exactly_assistant_turns(char_tok):
    msgs = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "XY"},
        {"role": "user", "content": "cd"},
        {"role": "assistant", "content": "ZW"},
    ]
    ex = encode_messages(char_tok, msgs)
    trained = char_tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=False)
    # The assistant contents and their end-of-turn markers train; user turns and role headers don't.
    assert trained.replace("<|im_end|>", "|").replace("\n", "") == "XY|ZW|<|endoftext|>"


def test_overlong_rows_are_counted_then_dropped_or_truncated(tmp_path, char_tok, caplog):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "9" * 50, "completion": "1" * 20}]
    r = read_rows(str(_jsonl(tmp_path / "o.jsonl", rows)))
    with caplog.at_level("WARNING", logger="posttrain"):
        out, stats = encode_rows(char_tok, r, "sft", max_length=60, overlong="drop")
    assert (stats.overlong, stats.dropped, len(out)) == (1, 1, 1)
    assert "1 of 2 rows are longer than max_length=60: 1 dropped" in caplog.text
    out, stats = encode_rows(char_tok, r, "sft", max_length=60, overlong="truncate")
    assert (stats.overlong, stats.truncated, len(out)) == (1, 1, 2) and len(out[1]) == 60


def test_builtin_task_splits_are_disjoint():
    train = read_rows("builtin:arithmetic", "train", num_examples=500)
    test = read_rows("builtin:arithmetic", "test", num_examples=100)
    assert not {r["prompt"] for r in train.rows} & {r["prompt"] for r in test.rows}
    for r in test.rows[:20]:
        expr = r["prompt"].rstrip("=")
        assert str(eval(expr)) == r["answer"]  # trusted generator text, not model output


def test_undecodable_and_corrupt_files_name_the_file_and_the_place(tmp_path):
    import pytest

    from posttrain.data.io import DataError, read_rows

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 32 of the file: b'\\xe9\"}\\n'\)"):
        read_rows(str(bad))
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("prompt,completion\na,b\n".encode("utf-16"))
    with pytest.raises(DataError, match="u16.csv: the file is UTF-16 encoded"):
        read_rows(str(utf16))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')  # what Windows editors write: accepted
    assert read_rows(str(bom)).rows == [{"prompt": "a"}]
    pq = tmp_path / "bad.parquet"
    pq.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        read_rows(str(pq))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match="ragged.csv:3: more fields than the header"):
        read_rows(str(ragged))
    with pytest.raises(DataError, match="not a regular file"):
        read_rows("/dev/null")
