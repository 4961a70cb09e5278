"""Efficiency methods, looked up by name: `get_method("duo", sparsity=0.5)`."""

from duokit.methods.base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
