"""Efficiency methods, looked up by name: `get_method("duo", sparsity=0.5)`."""

from duokit.methods.base import METHODS, Method, discover_methods, get_method, method_class, register_method

__all__ = ["METHODS", "Method", "discover_methods", "get_method", "method_class", "register_method"]
