"""otaguard: secure over-the-air updates for industrial IoT fleets.

The package is split along trust boundaries (see docs/design.md):

- :mod:`otaguard.model`  pure types and errors, imported by every other part
- :mod:`otaguard.crypto` keys, signers and the self-made certificate authority
- :mod:`otaguard.repo`   building, signing and verifying the image repository
- :mod:`otaguard.agent`  the device: verification, download, A/B install
- :mod:`otaguard.server` the update server (ASGI) and its storage adapters
- :mod:`otaguard.sim`    the demo fleet and attack scenarios
- :mod:`otaguard.cli`    the thin command-line front end
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
