"""medrelay gateway server: Starlette app, store, broker, membership, delivery, CLI."""
