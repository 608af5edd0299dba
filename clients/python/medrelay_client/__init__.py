"""medrelay Python client SDK: async client, key store, chat CLI."""
