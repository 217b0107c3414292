"""see-ray: SEE (Sequential Ensemble of Experts) continual learning for LLMs, trained and served on Ray.

One module per role; a request travels api -> serve (dispatcher) -> router -> expert -> prompts.
"""

__version__ = "0.1.0"
