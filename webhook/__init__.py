"""sidemesh: a small, real service mesh for Kubernetes.

The import package is ``webhook``; the distribution and the console script are ``sidemesh``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
