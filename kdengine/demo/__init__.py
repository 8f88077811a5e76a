"""`kdengine demo`: a real teacher distilled end to end on a CPU.

Modules: problems (seeded GSM8K-style word problems), teacher (the SmolLM2 GGUF and its conversion to
a model directory), pipeline (the stages: data -> dump -> student -> train -> GSM8K eval -> held-out
KL), summary (summary.json, summary.md, summary.png), errors (DemoError).
"""
