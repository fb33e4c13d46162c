"""ComfyUI entry for a clone of this repository in `custom_nodes/`: hands ComfyUI the node
pack in `integrations/comfy/` (the `wavepass_comfy` package of an installed wavepass).

Without an install, the clone's own `wavepass` and `integrations/comfy` are imported from
here (nothing beyond ComfyUI's own torch is needed, so the pack ships no requirements.txt).
The pack is imported only when ComfyUI calls `comfy_entrypoint`, so importing this file
outside ComfyUI (as pytest does with a package at its root) needs nothing.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def _pack():
    try:
        return importlib.import_module("wavepass_comfy")
    except ImportError:
        pass
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))  # for `import wavepass`
    folder = _ROOT / "integrations" / "comfy"
    spec = importlib.util.spec_from_file_location(
        "wavepass_comfy", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["wavepass_comfy"] = module
    spec.loader.exec_module(module)
    return module


async def comfy_entrypoint():
    return await _pack().comfy_entrypoint()
