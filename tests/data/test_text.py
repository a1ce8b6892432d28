import json

import pytest
import torch

from frugal_qat.data import text
from frugal_qat.data.text import (
    load_documents,
    parse_hub_source,
    source_fingerprint,
    tokenize_documents,
    tokenizer_fingerprint,
)
from frugal_qat.errors import DataError
from tests.conftest import make_tokenizer


def test_txt_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\nsecond line\n")
    assert load_documents(str(p)) == ["first line\nsecond line\n"]


def test_jsonl_one_document_per_line_blank_lines_skipped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(p)) == ["one", "two"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"content": "x"}', 'a.jsonl:3: no "text" string field'),
        ("{not json", "a.jsonl:3: not valid JSON"),
        ('{"text": 5}', 'a.jsonl:3: no "text"'),
        ('["text"]', 'a.jsonl:3: no "text"'),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, expected):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n' + bad_line + "\n")
    with pytest.raises(DataError, match=expected.replace("[", r"\[")):
        load_documents(str(p))


def test_directory_recursive_sorted_known_suffixes_only(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.rst.txt").write_text("rst")
    (tmp_path / "b" / "y.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    (tmp_path / "a.md").write_text("md")
    (tmp_path / "c.txt").write_text("   \n")  # whitespace only: dropped
    (tmp_path / "skip.py").write_text("python")
    (tmp_path / "skip.dat").write_text("data")
    assert load_documents(str(tmp_path)) == ["md", "j1", "j2", "rst"]


def test_missing_path_and_empty_text_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="holds no .txt"):
        load_documents(str(tmp_path / "d"))


def test_non_utf8_file_is_data_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_documents(str(p))


def test_parse_hub_source_default_and_explicit_split():
    assert parse_hub_source("wikitext2") == ("wikitext2", "test")
    assert parse_hub_source("wikitext2:train") == ("wikitext2", "train")
    assert parse_hub_source("c4") == ("c4", "validation")
    assert parse_hub_source("redpajama") == ("redpajama", "train")
    assert parse_hub_source("my_file.txt") is None


class _FakeDatasets:
    def __init__(self, rows=None, error=None):
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, path, name=None, data_files=None, split=None):
        self.calls.append((path, name, data_files, split))
        if self.error:
            raise self.error
        return {"text": self.rows}


def test_wikitext2_is_joined_with_blank_lines(monkeypatch):
    fake = _FakeDatasets(rows=["a", "", " b"])
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    assert load_documents("wikitext2") == ["a\n\n\n\n b"]
    assert fake.calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", None, "test")]
    load_documents("c4:train")
    assert fake.calls[-1][0] == "allenai/c4" and fake.calls[-1][3] == "train"
    assert "c4-train.00000" in fake.calls[-1][2]["train"]


def test_unreachable_hub_is_data_error_suggesting_local_file(monkeypatch):
    fake = _FakeDatasets(error=ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    with pytest.raises(DataError, match=r"offline; pass a local \.txt/\.jsonl/\.parquet file"):
        load_documents("redpajama")


def test_local_path_wins_over_dataset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "x.txt").write_text("local")
    monkeypatch.setattr(text, "_load_hub", lambda *a: pytest.fail("hub must not be used"))
    assert load_documents("c4") == ["local"]


def test_tokenize_joins_documents_with_eos_only_between():
    tok = make_tokenizer()
    docs = ["The quick brown fox", "jumps over", "the lazy dog.", "To be", "or not to be"]
    stream = tokenize_documents(tok, docs, batch_size=2)
    expected = []
    for i, d in enumerate(docs):
        if i:
            expected.append(tok.eos_token_id)
        expected.extend(tok(d, add_special_tokens=False)["input_ids"])
    assert stream.dtype == torch.int64
    assert stream.tolist() == expected
    assert (stream == tok.eos_token_id).sum() == len(docs) - 1
    assert torch.equal(stream, tokenize_documents(tok, docs, batch_size=64))


def test_tokenize_without_eos_is_data_error():
    tok = make_tokenizer()
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        tokenize_documents(tok, ["a b"])


def test_fingerprints_change_with_file_and_tokenizer(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello")
    before = source_fingerprint(str(p))
    assert source_fingerprint(str(p)) == before
    p.write_text("hello, world")
    assert source_fingerprint(str(p)) != before
    assert source_fingerprint("wikitext2") == "hub:wikitext2:test"
    base = tokenizer_fingerprint(_word_tokenizer(["the cat sat", "on the mat"]))
    assert tokenizer_fingerprint(_word_tokenizer(["the cat sat", "on the mat"])) == base
    assert tokenizer_fingerprint(_word_tokenizer(["the cat sat", "on the rug"])) != base


def _word_tokenizer(sentences):
    """A deterministic word-level tokenizer (conftest's BPE draws its initial alphabet from an unordered set)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_demo_calibration_and_heldout_have_different_fingerprints():
    """Both read the same corpus directory; a shared cache key would evaluate on calibration text."""
    from frugal_qat.data.text import source_fingerprint

    assert source_fingerprint("demo") != source_fingerprint("demo-heldout")


def test_demo_names_mean_the_built_in_text_even_beside_a_folder_called_demo(tmp_path, monkeypatch):
    # `frugal-qat demo` writes its runs into ./demo; its own `--calib demo` must not then read that folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("a local folder, not the demo text")
    monkeypatch.setattr("frugal_qat.data.demo.demo_texts", lambda: (["built-in calibration"], ["built-in tutorial"]))
    monkeypatch.setattr("frugal_qat.data.demo.demo_source_dir", lambda: tmp_path / "builtin-corpus")
    (tmp_path / "builtin-corpus").mkdir()
    (tmp_path / "builtin-corpus" / "doc.txt").write_text("built-in")
    assert text.load_documents("demo") == ["built-in calibration"]
    assert text.load_documents("demo-heldout") == ["built-in tutorial"]
    assert text.load_documents("./demo") == ["a local folder, not the demo text"]
    assert "builtin-corpus" in text.source_fingerprint("demo")
    assert "builtin-corpus" not in text.source_fingerprint("./demo")


# ---- streaming in a seeded order ----------------------------------------------------------------------------------


def test_seeded_order_is_a_lazy_seeded_permutation():
    from itertools import islice

    order = list(text.seeded_order(500, seed=1, purpose="t"))
    assert sorted(order) == list(range(500))
    assert order == list(text.seeded_order(500, seed=1, purpose="t"))
    assert order != list(text.seeded_order(500, seed=2, purpose="t"))
    assert order != list(text.seeded_order(500, seed=1, purpose="u"))
    # Lazy: the first items of an astronomically long order cost nothing, and are those of the full order.
    assert list(islice(text.seeded_order(10**15, seed=1, purpose="t"), 3)) == list(
        islice(text.seeded_order(10**15, seed=1, purpose="t"), 3)
    )
    assert list(islice(text.seeded_order(500, seed=1, purpose="t"), 7)) == order[:7]


def test_shuffle_buffer_permutes_reading_at_most_a_buffer_ahead():
    pulled = []

    def docs():
        for i in range(300):
            pulled.append(i)
            yield f"d{i}"

    out = []
    for doc in text.shuffle_buffer(docs(), seed=0, max_chars=10**9, max_docs=10):
        out.append(doc)
        assert len(pulled) <= len(out) + 9, "the buffer must not read ahead of its size"
    assert sorted(out) == sorted(f"d{i}" for i in range(300)) and out != [f"d{i}" for i in range(300)]
    assert out == list(text.shuffle_buffer((f"d{i}" for i in range(300)), seed=0, max_chars=10**9, max_docs=10))
    by_chars = list(text.shuffle_buffer((f"d{i:03d}" for i in range(300)), seed=0, max_chars=40, max_docs=10**9))
    assert sorted(by_chars) == [f"d{i:03d}" for i in range(300)]


def _units(path):
    local = text._LocalUnits.of(text.source_files(path))
    return [list(local.docs(u)) for u in range(local.total)]


def test_jsonl_stretches_tile_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "STRETCH_BYTES", 64)
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i * 7 % 150), "meta": {"i": i}}) for i in range(40)]
    lines[5] = ""  # blank lines are skipped
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines) + "\n")
    units = _units(p)
    assert len(units) == -(-p.stat().st_size // 64)
    assert [d for u in units for d in u] == load_documents(str(p))  # every line once, in file order
    assert any(len(u) == 0 for u in units) and any(len(u) > 1 for u in units)


def test_large_text_file_is_read_in_pieces_that_tile_it(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "PIECE_BYTES", 100)
    monkeypatch.setattr(text, "_LINE_SEARCH_BYTES", 16)
    body = "".join(f"line {i} of the file\n" for i in range(30)) + "é" * 300 + "\nend\n"  # a long line of 2-byte chars
    p = tmp_path / "big.txt"
    p.write_text(body)
    units = _units(p)
    assert all(len(u) == 1 for u in units[:-1])
    pieces = [d for u in units for d in u]
    assert "".join(pieces) == body and len(pieces) > 5
    assert all(piece.endswith("\n") or piece.endswith("é") for piece in pieces[:-1])
    assert sorted(text.iter_documents(str(p), seed=0)) == sorted(piece for piece in pieces if piece.strip())
    assert load_documents(str(p)) == [body], "evaluation reads a text file whole"


def _write_parquet(path, texts, row_group_size=2, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def test_parquet_source_row_groups(tmp_path):
    p = tmp_path / "a.parquet"
    _write_parquet(p, ["one", "two", "", "three", None, "four", "five"])
    assert load_documents(str(p)) == ["one", "two", "three", "four", "five"]
    assert _units(p) == [["one", "two"], ["three"], ["four"], ["five"]]  # row groups of 2 rows
    assert sorted(text.iter_documents(str(p), seed=3)) == ["five", "four", "one", "three", "two"]
    bad = tmp_path / "b.parquet"
    _write_parquet(bad, ["x"], column="content")
    with pytest.raises(DataError, match="b.parquet has no 'text' column \\(columns: content, id\\)"):
        load_documents(str(bad))
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="c.parquet is not a readable parquet file"):
        list(text.iter_documents(str(tmp_path / "c.parquet"), seed=0))


def test_folder_streams_every_document_once_in_a_seeded_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "sub" / "c.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)))
    _write_parquet(tmp_path / "d.parquet", [f"pq {i}" for i in range(30)], row_group_size=5)
    (tmp_path / "skip.py").write_text("not text")
    everything = load_documents(str(tmp_path))
    assert len(everything) == 62 and "not text" not in everything
    first = list(text.iter_documents(str(tmp_path), seed=0))
    assert sorted(first) == sorted(everything)
    assert first == list(text.iter_documents(str(tmp_path), seed=0))
    assert first != list(text.iter_documents(str(tmp_path), seed=1)) and first != everything


def test_streamed_bad_line_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "STRETCH_BYTES", 50)
    rows = [json.dumps({"text": f"row {i}"}) for i in range(40)]
    rows[29] = '{"text": "unterminated'
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:30: not valid JSON"):
        list(text.iter_documents(str(p), seed=0))


def test_streamed_empty_source_is_data_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match="holds no text"):
        list(text.iter_documents(str(tmp_path / "empty.jsonl"), seed=0))


def test_streamed_hub_joined_dataset_and_unreachable_hub(monkeypatch):
    class Stream(list):
        n_shards = 1

    class FakeDatasets:
        def __init__(self, error=None):
            self.error = error

        def load_dataset(self, path, name=None, data_files=None, split=None, streaming=False):
            assert streaming
            if self.error:
                raise self.error
            return Stream([{"text": "a"}, {"text": ""}, {"text": " b"}])

    monkeypatch.setitem(__import__("sys").modules, "datasets", FakeDatasets())
    assert list(text.iter_documents("wikitext2:train", seed=0)) == ["a\n\n\n\n b"]
    monkeypatch.setitem(__import__("sys").modules, "datasets", FakeDatasets(ConnectionError("offline mode")))
    with pytest.raises(DataError, match=r"could not load dataset 'c4'.*offline; pass a local"):
        list(text.iter_documents("c4:train", seed=0))
