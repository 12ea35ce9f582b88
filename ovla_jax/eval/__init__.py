"""Closed-loop evaluation of policies on the built-in tabletop tasks (``ovla-jax eval``)."""
