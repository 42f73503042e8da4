"""twofold: mutual TLS plus JWS-signed request bodies, both sides.

The client toolkit in ten lines::

    import twofold
    with twofold.Client("https://localhost:8443", cert="mtls.crt", key="mtls.key",
                        signing_key="sign.key", verify="ca.pem") as api:
        print(api.get("/accessapi/balance").json())
"""

from twofold.client import AsyncClient, Client, JWSAuth
from twofold.errors import TwofoldError

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "JWSAuth", "TwofoldError", "__version__"]
