"""Every script under scripts/ parses its command line, so that `--help` explains it instead of
starting the work (codec_teacher_cache.py once ran its 5-minute teacher pass on --help)."""
import ast
from pathlib import Path

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def _has_main_block(tree):
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _uses_a_parser(source):
    # argparse, or a click command of the CLI (scripts/train.py runs `kdengine train`'s)
    return "argparse.ArgumentParser(" in source or "import click" in source or "_command.main(" in source


def test_every_runnable_script_has_a_parser():
    sources = {p.name: p.read_text() for p in SCRIPTS}
    runnable = {name: src for name, src in sources.items() if _has_main_block(ast.parse(src))}
    assert len(runnable) > 20, sorted(runnable)
    missing = [name for name, src in runnable.items() if not _uses_a_parser(src)]
    assert not missing, f"scripts without argparse/click (their --help would run them): {missing}"
