"""Read llm-engine's endpoint-config file: base64-encoded JSON, mounted into the pod by llm-engine.

Only the read lives here (the one file the worker's configuration reads); how its fields fill the
settings is ``settings.apply_endpoint_config``, which is pure.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from forwarder.errors import ConfigError

#: The variable naming the file, for error messages.
VARIABLE = "FORWARDER_ENDPOINT_CONFIG_PATH"


def read_endpoint_config(path: str) -> dict[str, Any]:
    """The endpoint-config object stored (base64 JSON) at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not base64 JSON, or does not hold an object.
    """
    try:
        with open(path, "rb") as handle:
            config = json.loads(base64.b64decode(handle.read(), validate=False))
    except OSError as exc:
        raise ConfigError(VARIABLE, path, f"cannot be read ({exc.strerror})") from None
    except (binascii.Error, ValueError):
        raise ConfigError(VARIABLE, path, "is not base64-encoded JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(VARIABLE, path, "does not hold a JSON object")
    return config
