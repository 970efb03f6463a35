"""The demo's built-in world: toy faces, the demo data writer, the tiny models, real files from PyPI wheels."""
