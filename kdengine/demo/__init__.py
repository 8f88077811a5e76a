"""`kdengine demo`: a real teacher distilled end to end on a CPU (problems, pipeline, summary)."""
