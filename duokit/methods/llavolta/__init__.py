"""`llavolta`: visual-token pooling inside the language model (LLaVolta, arXiv 2406.20092)."""
