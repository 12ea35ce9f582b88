"""``ovla-jax serve``: a policy server for the official OpenVLA REST client and openpi's websocket client."""
