"""Identity providers: who a bearer token says the user is."""

from .base import IdentityProvider, Principal
from .dev import DevIssuer

__all__ = ["DevIssuer", "IdentityProvider", "Principal"]
