"""`python -m ovla_jax <verb>` == `ovla-jax <verb>`."""
from ovla_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
