"""GSM8K evaluation: answer extraction and scoring (gsm8k.py), input files (data.py), prompts and
generation (generation.py), reports (report.py), and the two end-to-end runs (run.py)."""
from kdengine.evals.gsm8k import CASCADES, DEFAULT_CASCADE, EvalError, extract_answer, parse_reference
from kdengine.evals.run import evaluate_model, evaluate_responses

__all__ = ["CASCADES", "DEFAULT_CASCADE", "EvalError", "extract_answer", "parse_reference", "evaluate_model", "evaluate_responses"]
