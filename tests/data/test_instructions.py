import json

import pytest
import torch

from frugal_qat.data.instructions import IGNORE_INDEX, alpaca_examples, alpaca_prompt, bos_prefix
from frugal_qat.errors import DataError
from tests.conftest import make_tokenizer


def _bos_tokenizer():
    """conftest's tokenizer with a Llama-style post-processor that puts <s> before every text."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))]
    )
    return tok


ROWS = [
    {"instruction": "Say the quick brown fox.", "input": "", "output": "The quick brown fox."},
    {"instruction": "Repeat the text.", "input": "To be or not to be", "output": "To be or not to be"},
    {"instruction": "Name what glitters.", "output": "Not all gold."},
    {"instruction": "Finish the line.", "input": "A journey of a thousand miles", "output": "begins with a step."},
]


@pytest.fixture
def alpaca_file(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(ROWS))
    return p


def test_prompt_follows_the_reference_with_and_without_input():
    assert alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response: "
    )
    assert alpaca_prompt("Do X.", "on Y") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\non Y\n\n### Response: "
    )
    assert alpaca_prompt("Do X.", "") == alpaca_prompt("Do X.", None) == alpaca_prompt("Do X.")


def test_bos_prefix_is_what_the_tokenizer_adds():
    bos_tok = _bos_tokenizer()
    assert bos_prefix(bos_tok) == [bos_tok.convert_tokens_to_ids("<s>")]
    assert bos_prefix(make_tokenizer()) == []  # no post-processor: adds nothing (as Qwen2, SmolLM2)


@pytest.mark.parametrize("with_bos", [True, False])
def test_sequence_layout_and_labels(alpaca_file, with_bos):
    tok = _bos_tokenizer() if with_bos else make_tokenizer()
    ids, labels = alpaca_examples(tok, alpaca_file, source_len=400, target_len=40, n=4, seed=0)
    assert ids.shape == labels.shape == (4, 440) and ids.dtype == labels.dtype == torch.int64
    prefix = bos_prefix(tok)
    seen = set()
    for r in range(4):
        row = next(x for x in ROWS if x["output"] not in seen and _starts(ids[r], tok, prefix, x))
        seen.add(row["output"])
        text = alpaca_prompt(row["instruction"], row.get("input"))
        prompt = prefix + tok(text, add_special_tokens=False)["input_ids"]
        target = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_src, n_tgt = len(prompt), len(target)
        assert ids[r, :n_src].tolist() == prompt
        assert ids[r, n_src : n_src + n_tgt].tolist() == target
        assert (ids[r, n_src + n_tgt :] == tok.eos_token_id).all()  # no pad token: EOS pads
        assert (labels[r, :n_src] == IGNORE_INDEX).all() and (labels[r, n_src + n_tgt :] == IGNORE_INDEX).all()
        assert labels[r, n_src : n_src + n_tgt].tolist() == target
    assert len(seen) == 4


def _starts(row_ids, tok, prefix, example):
    prompt = prefix + tok(alpaca_prompt(example["instruction"], example.get("input")), add_special_tokens=False)[
        "input_ids"]
    return row_ids[: len(prompt)].tolist() == prompt


def test_truncation_keeps_bos_and_the_response_cue(alpaca_file):
    tok = _bos_tokenizer()
    ids, labels = alpaca_examples(tok, alpaca_file, source_len=30, target_len=3, n=4, seed=0)
    bos = bos_prefix(tok)
    cue = tok("### Response: ", add_special_tokens=False)["input_ids"]
    expected = set()
    for row in ROWS:
        prompt = tok(alpaca_prompt(row["instruction"], row.get("input")), add_special_tokens=False)["input_ids"]
        assert len(prompt) > 29  # every prompt is cut
        # Cut to 3 tokens: the EOS goes too, as in the reference.
        target = tok(row["output"], add_special_tokens=False)["input_ids"][:3]
        expected.add(tuple(bos + prompt[-29:] + target))
    assert {tuple(r) for r in ids.tolist()} == expected, "the prompt loses tokens on its left, after the BOS"
    assert all(r[30 - len(cue) : 30] == cue for r in ids.tolist())
    assert (labels[:, :30] == IGNORE_INDEX).all() and (labels[:, 30:] == ids[:, 30:]).all()


def test_seeded_choice_prefix_stable_and_jsonl(alpaca_file, tmp_path):
    tok = make_tokenizer()
    a = alpaca_examples(tok, alpaca_file, 200, 20, 3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, alpaca_examples(tok, alpaca_file, 200, 20, 3, seed=1)))
    two = alpaca_examples(tok, alpaca_file, 200, 20, 2, seed=1)
    assert torch.equal(two[0], a[0][:2])
    others = [alpaca_examples(tok, alpaca_file, 200, 20, 3, seed=s)[0] for s in range(2, 6)]
    assert any(not torch.equal(o, a[0]) for o in others)
    jl = tmp_path / "alpaca.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert all(torch.equal(x, y) for x, y in zip(a, alpaca_examples(tok, jl, 200, 20, 3, seed=1)))


def test_bad_instruction_data_errors(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(DataError, match="does not exist"):
        alpaca_examples(tok, tmp_path / "nope.json", 10, 10, 1, 0)
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ROWS))
    with pytest.raises(DataError, match="has 4 examples; --train-size 5 needs that many"):
        alpaca_examples(tok, p, 10, 10, 5, 0)
    p.write_text(json.dumps([*ROWS, {"instruction": "x", "response": "y"}]))
    with pytest.raises(DataError, match="example 4 lacks an 'instruction' or 'output' string"):
        alpaca_examples(tok, p, 10, 10, 1, 0)
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="a.jsonl:2: not valid JSON"):
        alpaca_examples(tok, jl, 10, 10, 1, 0)
