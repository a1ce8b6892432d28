"""Failures that are not FrugalQATErrors but still reach the user as one line: a CUDA out-of-memory error."""

import torch

from frugal_qat.cli import main as cli
from frugal_qat.precision import deterministic


def test_out_of_memory_is_one_line_with_the_fix(monkeypatch, capsys):
    def boom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total)")

    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv):
        args = real(argv)
        args.fn = boom
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": staticmethod(parse)})())
    code = cli.main(["e2e-qp", "--run", "RUN"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "out of GPU memory in `frugal-qat e2e-qp`" in err and "Tried to allocate 20.00 GiB" in err
    assert "frugal-qat plan" in err and "--logits-chunk" in err and "resumes" in err


def test_other_exceptions_keep_their_traceback(monkeypatch):
    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv):
        args = real(argv)
        args.fn = lambda a: 1 / 0
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": staticmethod(parse)})())
    try:
        cli.main(["ppl", "--model", "M", "--data", "D"])
    except ZeroDivisionError:
        return
    raise AssertionError("a bug was swallowed")


def test_deterministic_mode_is_scoped():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()
