"""Development and test tooling: local servers, the demo and the README generator (never in the image)."""
