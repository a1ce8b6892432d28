import pytest
import torch

from frugal_qat.data import windows
from frugal_qat.data.windows import build_calibration, eval_windows, fingerprint_windows, sample_windows
from frugal_qat.errors import DataError
from tests.conftest import CORPUS, make_tokenizer


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


@pytest.fixture
def calib_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text(CORPUS * 20)
    (d / "b.jsonl").write_text('{"text": "%s"}\n' % (CORPUS * 20).strip())
    return d


def test_build_calibration_shapes_disjoint_deterministic(calib_dir):
    tok = make_tokenizer()
    train, val = build_calibration(tok, str(calib_dir), n_train=6, n_val=2, seqlen=32, seed=0, cache_dir=None)
    assert train.shape == (6, 32) and val.shape == (2, 32)
    # Same draw as sampling the stream directly: train and val are distinct windows of one disjoint grid.
    stream = windows.load_token_stream(tok, str(calib_dir))
    both = sample_windows(stream, 8, 32, seed=0)
    assert torch.equal(torch.cat([train, val]), both)
    train2, val2 = build_calibration(tok, str(calib_dir), 6, 2, 32, seed=0, cache_dir=None)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    with pytest.raises(ValueError, match="n_train >= 1"):
        build_calibration(tok, str(calib_dir), 0, 2, 32, seed=0)


def test_build_calibration_not_enough_text(calib_dir):
    with pytest.raises(DataError, match="give more text"):
        build_calibration(make_tokenizer(), str(calib_dir), 4096, 64, 2048, seed=0)


def test_token_cache_hit_and_invalidation(calib_dir, tmp_path, monkeypatch):
    tok = make_tokenizer()
    cache = tmp_path / "cache"
    calls = []
    real_tokenize = windows.tokenize_documents
    monkeypatch.setattr(windows, "tokenize_documents", lambda t, d: calls.append(1) or real_tokenize(t, d))

    first = build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".safetensors"  # no tmp file left
    second = build_calibration(tok, str(calib_dir), 4, 2, 16, seed=5, cache_dir=cache)
    assert len(calls) == 1, "second call must come from the cache"
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    # A changed file (new size and mtime) misses the cache and yields the new text's tokens.
    (calib_dir / "a.txt").write_text("Every cloud has a silver lining. " * 400)
    stream = windows.load_token_stream(tok, str(calib_dir), cache)
    assert len(calls) == 2
    assert torch.equal(stream, real_tokenize(tok, windows.load_documents(str(calib_dir))))
    assert len(list(cache.iterdir())) == 2


def test_unreadable_cache_file_is_rebuilt(calib_dir, tmp_path):
    tok = make_tokenizer()
    cache = tmp_path / "cache"
    good = windows.load_token_stream(tok, str(calib_dir), cache)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(b"\x00garbage")
    assert torch.equal(windows.load_token_stream(tok, str(calib_dir), cache), good)
    assert torch.equal(windows.load_token_stream(tok, str(calib_dir), cache), good)
