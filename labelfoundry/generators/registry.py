"""Built-in generator names -> files shipped inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN = {"toyfaces-64": "toyfaces-64.safetensors"}


def resolve_generator_path(name: str | Path) -> Path:
    """A built-in name or a path -> an existing file path, with an error that says what to do."""
    if str(name) in BUILTIN:
        p = Path(str(resources.files("labelfoundry").joinpath("assets", BUILTIN[str(name)])))
        if not p.exists():
            raise FileNotFoundError(
                f"the built-in generator {name!r} is not in this install ({p} is missing); "
                "train it with `labelfoundry train-generator` or reinstall the package"
            )
        return p
    p = Path(name).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"generator checkpoint {p} not found; pass a built-in name ({', '.join(BUILTIN)}) "
            "or a .pkl (NVIDIA), .pt (rosinality) or .safetensors (labelfoundry) file"
        )
    return p
