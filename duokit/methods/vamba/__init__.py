"""`vamba`: text-global / video-local attention, a training-free proxy of Vamba's cost structure (arXiv 2503.11579)."""
