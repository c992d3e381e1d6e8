"""Config loading shared by every CLI: a YAML file that must hold a mapping."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import HgkdError


def load_mapping(path: str, label: str) -> dict[str, Any]:
    """Read YAML at ``path``; any problem is one HgkdError line starting with ``label``."""
    try:
        blob = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise HgkdError(f"{label}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise HgkdError(f"{label}: invalid YAML ({str(err).splitlines()[0]})") from None
    if blob is None:
        return {}
    if not isinstance(blob, dict):
        raise HgkdError(f"{label}: expected a mapping of key: value")
    return blob
