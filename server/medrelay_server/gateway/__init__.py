"""The WebSocket gateway: socket endpoint, per-connection bounded queue, local registry."""
