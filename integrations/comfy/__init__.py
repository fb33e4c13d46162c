"""wavepass for ComfyUI: the `wavespeed` node pack (First Block Cache + torch.compile).

ComfyUI finds the pack through `comfy_entrypoint` (its V3 extension API), from a clone of
this repository in `custom_nodes/` (the repository's root `__init__.py` hands it this
package) or from an install of the `wavepass` distribution, where it is `wavepass_comfy`.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class WavepassExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> WavepassExtension:
    return WavepassExtension()
