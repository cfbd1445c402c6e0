"""Unit tests of the App, the Context and reply aggregation (no sockets).

A package, so that its module names (``test_dispatch``, ``test_context``...) cannot clash
with test modules of the same name elsewhere under tests/.
"""
