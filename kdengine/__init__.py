"""kdengine: white-box logit distillation (teacher top-k store, sparse KL kernel, GSM8K evaluation).

Importing the package is cheap: subpackages pull in transformers, zstandard or the compiled
extension only when they are used.
"""

__version__ = "0.1.0"
