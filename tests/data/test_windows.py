import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from frugal_qat.data import text, windows
from frugal_qat.data.windows import (
    _DocumentWindows,
    build_calibration,
    draw_windows,
    eval_windows,
    fingerprint_windows,
    sample_text_windows,
    sample_windows,
)
from frugal_qat.errors import DataError
from tests.conftest import CORPUS, make_tokenizer

# ---- windows of an in-memory stream (perplexity) ----------------------------------------------------------------


def _grid_index(tokens, window, seqlen):
    """The k with window == tokens[k*L:(k+1)*L] (tokens are unique, so at most one)."""
    matches = [k for k in range(tokens.numel() // seqlen) if torch.equal(tokens[k * seqlen : (k + 1) * seqlen], window)]
    assert len(matches) == 1, "window is not one of the disjoint grid windows"
    return matches[0]


def test_sample_windows_are_distinct_grid_windows():
    tokens = torch.arange(1000)  # unique values: a window identifies its position
    w = sample_windows(tokens, 20, 48, seed=3)
    assert w.shape == (20, 48) and w.dtype == torch.int64
    idx = [_grid_index(tokens, row, 48) for row in w]
    assert len(set(idx)) == 20
    assert max(idx) < 1000 // 48


def test_sample_windows_seeded_and_prefix_stable():
    tokens = torch.arange(5000)
    a = sample_windows(tokens, 30, 64, seed=1)
    assert torch.equal(a, sample_windows(tokens, 30, 64, seed=1))
    assert not torch.equal(a, sample_windows(tokens, 30, 64, seed=2))
    assert torch.equal(sample_windows(tokens, 10, 64, seed=1), a[:10])


def test_too_little_text_error_message():
    with pytest.raises(DataError) as err:
        sample_windows(torch.zeros(12345, dtype=torch.int64), 64, 512, seed=0)
    assert str(err.value) == (
        "calibration text has 12,345 tokens; 64 windows x 512 need 32,768; "
        "give more text (--calib) or lower --train-size/--seqlen"
    )
    # Exactly enough works: 24 windows of 512 fit in 12,345 tokens, 25 do not (no overlap, no repeat).
    assert sample_windows(torch.arange(12345), 24, 512, seed=0).shape == (24, 512)
    with pytest.raises(DataError):
        sample_windows(torch.arange(12345), 25, 512, seed=0)


def test_bad_stream_and_seqlen_are_value_errors():
    with pytest.raises(ValueError, match="1-D integer"):
        sample_windows(torch.zeros(10, 10, dtype=torch.int64), 1, 5, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        sample_windows(torch.zeros(100), 1, 5, seed=0)
    with pytest.raises(ValueError, match="seqlen"):
        sample_windows(torch.arange(100), 1, 0, seed=0)


def test_eval_windows_sequential():
    tokens = torch.arange(1000)
    w = eval_windows(tokens, 100)
    assert torch.equal(w, tokens.view(10, 100))
    assert torch.equal(eval_windows(torch.arange(1050), 100, max_windows=4), tokens[:400].view(4, 100))
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(torch.arange(99), 100)
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        eval_windows(tokens, 100, max_windows=0)


def test_eval_windows_random():
    tokens = torch.arange(10_000)
    w = eval_windows(tokens, 100, max_windows=16, protocol="random")
    assert torch.equal(w, eval_windows(tokens, 100, max_windows=16, protocol="random", seed=0))
    assert not torch.equal(w, eval_windows(tokens, 100, max_windows=16, protocol="random", seed=1))
    assert len({_grid_index(tokens, row, 100) for row in w}) == 16
    with pytest.raises(ValueError, match="needs max_windows"):
        eval_windows(tokens, 100, protocol="random")
    with pytest.raises(DataError, match="200 windows x 100 need 20,000"):
        eval_windows(tokens, 100, max_windows=200, protocol="random")
    with pytest.raises(ValueError, match="unknown perplexity protocol 'strided'"):
        eval_windows(tokens, 100, protocol="strided")


def test_fingerprint_windows():
    w = torch.arange(64).view(4, 16)
    fp = fingerprint_windows(w)
    assert len(fp) == 64 and fp == fingerprint_windows(w.clone())
    changed = w.clone()
    changed[3, 15] += 1
    assert fingerprint_windows(changed) != fp
    assert fingerprint_windows(w.view(8, 8)) != fp
    assert fingerprint_windows(w.to(torch.int32)) != fp


# ---- windows streamed from a source (calibration, pretraining) --------------------------------------------------

EOS = 2
BASE = 10_000  # document d holds the numbers BASE*(d+1), BASE*(d+1)+1, ...: a window's ids name its document


class NumberTokenizer:
    """Reads each whitespace-separated number as its own id: a window's ids tell its document and offset. Only the
    surface the data code uses (a call with add_special_tokens=False, eos_token_id, get_vocab for the fingerprint)."""

    eos_token_id = EOS
    name_or_path = "numbers"

    def __call__(self, docs, add_special_tokens=False, verbose=False):
        assert not add_special_tokens
        return {"input_ids": [[int(w) for w in doc.split()] for doc in docs]}

    def get_vocab(self):
        return {"</s>": EOS}

    def __len__(self):
        return 1 << 31


def number_tokenizer():
    return NumberTokenizer()


def number_doc(d: int, length: int) -> str:
    return " ".join(str(BASE * (d + 1) + j) for j in range(length))


def write_corpus(path, lengths):
    """A .jsonl file, one numbered document per line; returns path as a source string."""
    path.write_text("".join(json.dumps({"text": number_doc(d, n)}) + "\n" for d, n in enumerate(lengths)))
    return str(path)


def where(window):
    """(document, offset) of a window cut inside one numbered document; asserts it is one."""
    ids = window.tolist()
    d, offset = divmod(ids[0], BASE)
    assert ids == list(range(ids[0], ids[0] + len(ids))), "window is not a contiguous piece of one document"
    return d - 1, offset


LENGTHS = [5, 40, 12, 64, 33, 7, 100, 31, 48, 32, 90, 3, 75, 36, 50, 20, 64, 45, 80, 38] * 3


def test_documents_sampling_stays_inside_long_enough_documents(tmp_path):
    lengths = LENGTHS  # 60 documents, 42 of them >= 32 tokens
    source = write_corpus(tmp_path / "c.jsonl", lengths)
    w = draw_windows(number_tokenizer(), source, 30, 32, seed=0).windows
    assert w.dtype == torch.int32 and w.shape == (30, 32)
    places = [where(row) for row in w]
    docs = [d for d, _ in places]
    assert len(set(docs)) == 30, "one window per document while documents last"
    for d, offset in places:
        assert lengths[d] >= 32 and 0 <= offset <= lengths[d] - 32
    assert any(o == 0 for _, o in places) and any(o > 0 for _, o in places)


def test_documents_sampling_takes_further_disjoint_windows_when_documents_run_out(tmp_path):
    source = write_corpus(tmp_path / "c.jsonl", [700, 10, 150])
    w = draw_windows(number_tokenizer(), source, 22, 32, seed=3).windows
    places = [where(row) for row in w]
    by_doc = {d: sorted(o for dd, o in places if dd == d) for d in {0, 2}}
    assert set(d for d, _ in places) == {0, 2}
    assert places[0][0] != places[1][0], "the first pass takes one window from each document"
    for offsets in by_doc.values():  # one grid per document: no two windows overlap
        assert all(b - a >= 32 and (b - a) % 32 == 0 for a, b in zip(offsets, offsets[1:]))
    # 700 tokens fit 21 or 20 windows depending on the first offset, 150 fit 4 or 3: 22 is always reachable.
    with pytest.raises(DataError, match=r"fit \d+ disjoint windows; 30 windows x 32 need more.*--sampling joined"):
        draw_windows(number_tokenizer(), source, 30, 32, seed=3)


def test_joined_sampling_is_the_eos_joined_stream_cut_in_order(tmp_path):
    source = write_corpus(tmp_path / "c.jsonl", LENGTHS)
    tok = number_tokenizer()
    w = draw_windows(tok, source, 20, 32, seed=1, sampling="joined").windows
    docs = list(text.iter_documents(source, seed=1))
    stream = text.tokenize_documents(tok, docs)  # the old loader's stream, over the documents in streamed order
    assert torch.equal(w.long(), stream[: 20 * 32].view(20, 32))
    assert (w == EOS).any(), "joined windows cross document boundaries"


def test_joined_too_little_text_names_tokens_and_fix(tmp_path):
    source = write_corpus(tmp_path / "c.jsonl", [10, 20])
    with pytest.raises(DataError) as err:
        draw_windows(number_tokenizer(), source, 4, 16, seed=0, sampling="joined")
    assert str(err.value) == (
        "calibration text has 31 tokens; 4 windows x 16 need 64; "
        "give more text (--calib) or lower --train-size/--seqlen"
    )


@pytest.mark.parametrize("sampling", ["documents", "joined"])
def test_draws_are_seeded_and_prefix_stable(tmp_path, sampling):
    source = write_corpus(tmp_path / "c.jsonl", LENGTHS)
    tok = number_tokenizer()
    a = draw_windows(tok, source, 24, 32, seed=7, sampling=sampling).windows
    assert torch.equal(a, draw_windows(tok, source, 24, 32, seed=7, sampling=sampling).windows)
    assert torch.equal(a[:9], draw_windows(tok, source, 9, 32, seed=7, sampling=sampling).windows)
    assert not torch.equal(a, draw_windows(tok, source, 24, 32, seed=8, sampling=sampling).windows)


@pytest.mark.slow  # a fresh interpreter importing torch: ~8 s here
def test_same_windows_in_another_process(tmp_path):
    """No hidden state (hash seeds, generator state, thread timing) decides the windows."""
    source = write_corpus(tmp_path / "c.jsonl", LENGTHS)
    here = draw_windows(number_tokenizer(), source, 12, 32, seed=5).windows
    script = (
        "import sys; from tests.data.test_windows import number_tokenizer; "
        "from frugal_qat.data.windows import draw_windows; "
        f"w = draw_windows(number_tokenizer(), {source!r}, 12, 32, seed=5).windows; "
        "sys.stdout.write(','.join(map(str, w.flatten().tolist())))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout == ",".join(map(str, here.flatten().tolist()))


def test_streaming_reads_a_bounded_prefix(tmp_path, monkeypatch):
    """A corpus 500x larger than the windows need: only a few stretches are opened, whatever its size."""
    monkeypatch.setattr(text, "STRETCH_BYTES", 8 << 10)
    monkeypatch.setattr(text, "SHUFFLE_BUFFER_CHARS", 16 << 10)
    source = write_corpus(tmp_path / "big.jsonl", [40] * 20_000)  # 7.8 MB, ~960 stretches
    opened = []
    real = text._LocalUnits.docs
    monkeypatch.setattr(text._LocalUnits, "docs", lambda self, u: opened.append(u) or real(self, u))
    w = draw_windows(number_tokenizer(), source, 16, 32, seed=0).windows
    assert w.shape == (16, 32)
    # The buffer (~41 documents) plus one tokenizer batch (64) is ~105 documents: 6 stretches of ~20, of ~960.
    assert len(opened) <= 8
    assert max(where(row)[0] for row in w) > 2_000, "the documents come from beyond the start of the file"


def test_documents_sampling_keeps_at_most_two_n_windows():
    n, L = 8, 4
    keep = _DocumentWindows(n, L, seed=0)
    for d in range(40):
        keep.add(d, list(range(37 + d % 5)))  # 9-10 windows each
        assert keep.count() <= 2 * n
    assert len(keep.windows()) == n and len(keep.passes) == 1


def test_hub_source_streams_and_stops(monkeypatch):
    """A generator-backed Hub dataset with endless shards: the draw ends once the windows exist."""

    class Shard:
        def __init__(self, index):
            self.index = index

        def __iter__(self):
            j = 0
            while True:
                yield {"text": number_doc(self.index * 1000 + j, 40)}
                j += 1

    class Stream:
        n_shards = 4

        def shard(self, num_shards, index):
            assert num_shards == 4
            return Shard(index)

    calls = []

    class FakeDatasets:
        def load_dataset(self, path, name=None, data_files=None, split=None, streaming=False):
            calls.append((path, split, streaming))
            return Stream()

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets())
    w = draw_windows(number_tokenizer(), "redpajama", 12, 32, seed=0).windows
    assert calls == [("togethercomputer/RedPajama-Data-1T-Sample", "train", True)]
    shards = {where(row)[0] // 1000 for row in w}
    assert len(shards) >= 3, "documents mix the shards from the start"


@pytest.fixture
def calib_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text(CORPUS * 20)
    (d / "b.jsonl").write_text('{"text": "%s"}\n' % (CORPUS * 20).strip())
    return d


def test_build_calibration_val_first_then_train(calib_dir):
    tok = make_tokenizer()
    train, val = build_calibration(tok, str(calib_dir), n_train=6, n_val=2, seqlen=32, seed=0, cache_dir=None)
    assert train.shape == (6, 32) and val.shape == (2, 32) and train.dtype == torch.int64
    both = draw_windows(tok, str(calib_dir), 8, 32, seed=0).windows.long()
    assert torch.equal(torch.cat([val, train]), both)
    more_train, same_val = build_calibration(tok, str(calib_dir), 9, 2, 32, seed=0)
    assert torch.equal(same_val, val) and torch.equal(more_train[:6], train)
    j_train, j_val = build_calibration(tok, str(calib_dir), 6, 2, 32, seed=0, sampling="joined")
    assert not torch.equal(j_train, train)
    with pytest.raises(ValueError, match="n_train >= 1"):
        build_calibration(tok, str(calib_dir), 0, 2, 32, seed=0)
    with pytest.raises(ValueError, match="unknown sampling 'random'"):
        build_calibration(tok, str(calib_dir), 6, 2, 32, seed=0, sampling="random")


@pytest.mark.parametrize("sampling", ["documents", "joined"])
def test_cli_calibration_uses_the_configured_sampling(tmp_path, monkeypatch, sampling):
    """`frugal-qat block-ap --sampling joined` (data.sampling) reaches the draw; it was once dropped on the way."""
    from frugal_qat.cli import main as cli
    from frugal_qat.config import resolve

    source = write_corpus(tmp_path / "c.jsonl", LENGTHS)
    monkeypatch.setattr(cli, "load_tokenizer", lambda _model: number_tokenizer())
    monkeypatch.setenv("FRUGAL_QAT_CACHE", str(tmp_path / "cache"))
    cfg = resolve(None, {"data.calib": source, "data.train_size": 6, "data.val_size": 2, "data.seqlen": 32,
                         "data.seed": 4, "data.sampling": sampling})
    got = cli.calibration_windows(tmp_path, cfg)
    want = draw_windows(number_tokenizer(), source, 8, 32, seed=4, sampling=sampling).windows.long()
    assert torch.equal(got, torch.cat([want[2:], want[:2]]))  # [train, val], as the run stores them


def test_build_calibration_not_enough_text(calib_dir):
    with pytest.raises(DataError, match=r"calibration text has [\d,]+ tokens in 2 documents.*more text \(--calib\)"):
        build_calibration(make_tokenizer(), str(calib_dir), 4096, 64, 2048, seed=0)


def test_windows_cache_hit_and_invalidation(calib_dir, tmp_path, monkeypatch):
    tok = make_tokenizer()
    cache = tmp_path / "cache"
    calls = []
    real_draw = windows.draw_windows
    monkeypatch.setattr(windows, "draw_windows", lambda *a, **k: calls.append(1) or real_draw(*a, **k))

    first = build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".safetensors"  # no tmp file left
    second = build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache)
    assert len(calls) == 1, "second call must come from the cache"
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache, sampling="joined")
    assert len(calls) == 2, "another sampling is another draw"

    # A changed file (new size and mtime) misses the cache and yields the new text's windows.
    (calib_dir / "a.txt").write_text("Every cloud has a silver lining. " * 400)
    third = build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache)
    assert len(calls) == 3
    assert torch.equal(torch.cat([third[1], third[0]]), real_draw(tok, str(calib_dir), 6, 16, 5).windows.long())

    (cache_file,) = [f for f in cache.iterdir() if f.stat().st_mtime_ns == max(g.stat().st_mtime_ns
                                                                               for g in cache.iterdir())]
    cache_file.write_bytes(b"\x00garbage")  # unreadable: drawn again, same windows
    again = sample_text_windows(tok, str(calib_dir), 6, 16, 5, cache_dir=cache)
    assert torch.equal(again, torch.cat([third[1], third[0]])) and len(calls) == 4


def test_token_stream_cache_for_evaluation(calib_dir, tmp_path):
    tok = make_tokenizer()
    cache = tmp_path / "cache"
    good = windows.load_token_stream(tok, str(calib_dir), cache)
    assert torch.equal(good, text.tokenize_documents(tok, text.load_documents(str(calib_dir))))
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(b"\x00garbage")
    assert torch.equal(windows.load_token_stream(tok, str(calib_dir), cache), good)
    assert torch.equal(windows.load_token_stream(tok, str(calib_dir), cache), good)


def test_windows_are_int32_until_returned(tmp_path):
    source = write_corpus(tmp_path / "c.jsonl", LENGTHS)
    draw = draw_windows(number_tokenizer(), source, 4, 32, seed=0)
    assert draw.windows.dtype == torch.int32 and draw.documents >= 4 and draw.tokens >= 4 * 32
    out = sample_text_windows(number_tokenizer(), source, 4, 32, 0)
    assert out.dtype == torch.int64 and np.array_equal(out.numpy(), draw.windows.numpy())


def test_a_kill_while_writing_the_cache_leaves_nothing_the_next_writer_keeps(tmp_path):
    # The cache folder is shared by every run, so a partial file there is not a run's to delete on resume: each
    # writer works in a folder of its own, and the next writer removes the folders of processes that are gone.
    import signal
    import time

    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    code = ("import sys, torch\nfrom pathlib import Path\nfrom frugal_qat.data.windows import save_cache_file\n"
            "save_cache_file(Path(sys.argv[1]) / 'tokens-big.safetensors', "
            "{'tokens': torch.zeros(1 << 27, dtype=torch.int32)}, {})\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cache)])
    deadline = time.monotonic() + 120
    try:  # killed once safetensors has started its file inside the writer's folder
        while not list(cache.glob(".writing-*/.tmp*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no partial file seen"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = cache.glob(".writing-*")
    assert left.name.endswith(f"-{proc.pid}") and not (cache / "tokens-big.safetensors").exists()
    live = cache / f".writing-{windows.socket.gethostname()}-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    windows.save_cache_file(cache / "tokens-small.safetensors", {"tokens": torch.arange(5, dtype=torch.int32)}, {})
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, "tokens-small.safetensors"])
    assert torch.equal(load_file(cache / "tokens-small.safetensors")["tokens"], torch.arange(5, dtype=torch.int32))
