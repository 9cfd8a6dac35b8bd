"""sidemesh tests: one import root (``tests.support``, ``tests.conftest``)."""
