"""Import ComfyUI's own model code in tests (CPU only), from the copy that
`python scripts/fetch_comfyui.py` unpacks into `.cache/comfyui/ComfyUI`.

    import comfy_support
    comfy = comfy_support.load()          # None when the copy is missing
    # or, in a test module:
    comfy_support.require()               # pytest.skip(...) naming the fetch command

`load()` puts the unpacked folder on sys.path, sets ComfyUI's `--cpu` flag
(`comfy.cli_args.args.cpu = True`) and `--use-pytorch-cross-attention` (ComfyUI's default on
GPUs; on the CPU it would otherwise choose sub-quadratic attention, which calls psutil for the
free memory inside every attention call, a Dynamo graph break per block) before `comfy.model_management` is imported (that module
picks its device at import time), and, where the real torchvision / torchaudio cannot be
imported, registers the test-only STAND-INS below while it imports ComfyUI's model modules.

Stand-ins: ComfyUI imports torchvision and torchaudio at module level in model files that
`comfy.model_base` imports unconditionally (cosmos, cascade, rt_detr, sam3, lightricks audio
VAE, ace, gemma4, whisper, ...). PyPI's builds of those packages cannot load beside the CPU
torch of this project's venv, and none of the code the tests run calls them. So when (and
only when) `import torchvision` / `import torchaudio` fails, `load()` registers in
`sys.modules`, for the duration of its imports of ComfyUI's modules (COMFY_MODULES), minimal stand-in modules named `torchvision`, `torchvision.transforms`,
`torchvision.transforms.functional`, `torchvision.ops`, `torchaudio` and
`torchaudio.functional`. Each module hands out, for any public attribute that module-level
code looks up (e.g. `from torchvision.ops import roi_align`), a placeholder that raises
`RuntimeError` naming itself as a wavepass test stand-in when it is called or used. They are
marked with `__wavepass_stand_in__ = True`. They never shadow a working real package.

Nodes: `load_nodes()` also imports ComfyUI's `nodes` and `execution` modules (for
`nodes.common_ksampler`, the KSampler node's code path, and `execution.validate_prompt`), and
`load_extra_nodes()` registers ComfyUI's built-in extra nodes (`comfy_extras/`, e.g.
FluxGuidance, the LTXV, HunyuanVideo and SD3 latent nodes, SaveWEBM) as ComfyUI's
`init_extra_nodes` does, without API nodes or `custom_nodes/`. Both import under the same
stand-ins. Importing `nodes` needs `torchsde` (k-diffusion's samplers) and `av` (PyAV,
imported by `comfy_api`), both in the project's test extra; without them `load_nodes()`
returns None and `require_nodes()` skips. Extras whose own dependencies are
missing here (kornia, spandrel, aiohttp, ...) fail to import inside ComfyUI's loader, which
logs and skips them, just as ComfyUI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = ROOT / ".cache" / "comfyui" / "ComfyUI"
FETCH_COMMAND = "python scripts/fetch_comfyui.py"

STAND_IN_MODULES = {
    "torchvision": ("transforms", "ops"),
    "torchvision.transforms": ("functional",),
    "torchvision.transforms.functional": (),
    "torchvision.ops": (),
    "torchaudio": ("functional",),
    "torchaudio.functional": (),
}


class _StandInObject:
    """What a stand-in module returns for any attribute: fails loudly when actually used."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def _fail(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._qualname} is a wavepass test stand-in (tests/comfy_support.py): the real "
            "package cannot be imported beside this torch, and these tests must not call it"
        )

    __call__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandInObject(f"{self._qualname}.{name}")

    def __repr__(self):
        return f"<wavepass test stand-in {self._qualname}>"


def _make_stand_in(name: str, children: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(name, f"wavepass test stand-in for {name} (see tests/comfy_support.py)")
    module.__wavepass_stand_in__ = True
    module.__version__ = "0.0.0+wavepass-stand-in"
    if children:
        module.__path__ = []  # a package, so `import torchvision.ops` style imports resolve

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandInObject(f"{name}.{attr}")

    module.__getattr__ = __getattr__
    return module


def _install_stand_ins() -> list[str]:
    """Register the stand-ins for each of torchvision / torchaudio whose real import fails."""
    installed = []
    for top in ("torchvision", "torchaudio"):
        existing = sys.modules.get(top)
        if existing is not None:
            continue
        try:
            importlib.import_module(top)
            continue
        except Exception:  # ImportError, or an OSError/RuntimeError from a mismatched build
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
        modules = {
            name: _make_stand_in(name, children)
            for name, children in STAND_IN_MODULES.items()
            if name == top or name.startswith(top + ".")
        }
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(modules[parent], child, module)
            sys.modules[name] = module
        installed.append(top)
    return installed


stand_ins: list[str] = []

# The ComfyUI modules load() imports while the stand-ins are registered (everything the model
# tests use hangs off these).
COMFY_MODULES = (
    "comfy.model_management",
    "comfy.ops",
    "comfy.model_base",
    "comfy.model_patcher",
    "comfy.supported_models",
)


@contextlib.contextmanager
def _stand_ins_registered():
    """Register the stand-ins (where needed) for the imports inside; remove them afterwards."""
    installed = _install_stand_ins()
    stand_ins[:] = sorted(set(stand_ins) | set(installed))
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in installed]:
            if getattr(sys.modules[name], "__wavepass_stand_in__", False):
                del sys.modules[name]


def available() -> bool:
    return (COMFYUI_DIR / "comfy" / "model_management.py").is_file()


def _settle_library_probes():
    """Let libraries that probe for torchvision/torchaudio (and cache the answer) do it first.

    transformers asks `importlib.util.find_spec("torchvision")` once and caches the answer; it
    must see the truth (absent), not a stand-in, or it would route image code through it.
    """
    try:
        from transformers.utils import import_utils
    except ImportError:
        return
    import_utils.is_torchvision_available()
    import_utils.is_torchaudio_available()


def load():
    """Make ComfyUI importable on the CPU; return the `comfy` package, or None if not fetched.

    The stand-ins are in `sys.modules` only while COMFY_MODULES are imported; the ComfyUI
    modules keep the names they bound, and nothing imported later sees a fake torchvision.
    """
    if not available():
        return None
    if "comfy.supported_models" in sys.modules:
        return sys.modules["comfy"]
    path = str(COMFYUI_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = True
        # What ComfyUI picks by default on a GPU; on the CPU it would pick sub-quadratic
        # attention, which asks psutil for free memory in every block (a Dynamo graph break).
        args.use_pytorch_cross_attention = True
    _settle_library_probes()
    with _stand_ins_registered():
        for name in COMFY_MODULES:
            importlib.import_module(name)
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cpu":
        raise RuntimeError("comfy.model_management was imported before comfy_support.load() set --cpu")
    return sys.modules["comfy"]


def require():
    """load(), or skip the calling test module when the ComfyUI copy is missing."""
    import pytest

    comfy = load()
    if comfy is None:
        pytest.skip(
            f"ComfyUI's source is not at {COMFYUI_DIR}; run `{FETCH_COMMAND}` to fetch it",
            allow_module_level=True,
        )
    return comfy


# ComfyUI's node modules load_nodes() imports: `nodes` (KSampler and the core node set) and
# `execution` (prompt validation).
NODE_MODULES = ("nodes", "execution")
NODE_PACKAGES = ("torchsde", "av")  # what `import nodes` needs beyond ComfyUI's model code


def load_nodes():
    """load(), then import ComfyUI's `nodes` and `execution`; return `nodes`, or None when the
    ComfyUI copy or one of NODE_PACKAGES is missing."""
    if load() is None or any(importlib.util.find_spec(p) is None for p in NODE_PACKAGES):
        return None
    with _stand_ins_registered():
        for name in NODE_MODULES:
            importlib.import_module(name)
    return sys.modules["nodes"]


def require_nodes():
    """load_nodes(), or skip the calling test module naming what is missing."""
    import pytest

    require()
    nodes = load_nodes()
    if nodes is None:
        pytest.skip(
            f"ComfyUI's nodes need {', '.join(NODE_PACKAGES)}: pip install them into the venv",
            allow_module_level=True,
        )
    return nodes


_extra_nodes_loaded = False


def load_extra_nodes():
    """Register ComfyUI's built-in extra nodes (once), as `nodes.init_extra_nodes` does with
    custom and API nodes turned off; return `nodes` (None as load_nodes())."""
    global _extra_nodes_loaded
    nodes = load_nodes()
    if nodes is None or _extra_nodes_loaded:
        return nodes
    with _stand_ins_registered():
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _extra_nodes_loaded = True
    return nodes


def load_with_a_failing_compiler():
    """load(), then make every wavespeed compile raise (a test stand-in for an Inductor
    failure in one process of a Parallel Model run: the worker processes run this setup)."""
    load()
    import wavepass.backend

    def failing(*args, **kwargs):
        raise RuntimeError("simulated Inductor failure")

    wavepass.backend.compile_pieces = failing
