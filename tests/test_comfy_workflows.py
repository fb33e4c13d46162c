"""The node pack loads into ComfyUI, and every demo workflow in `workflows/` validates.

The pack is loaded the way ComfyUI loads a clone of this repository in `custom_nodes/`:
`nodes.load_custom_node(<repository root>)` imports the root `__init__.py`, whose
`comfy_entrypoint` hands ComfyUI the `wavepass_comfy` extension. ComfyUI's built-in extra
nodes (FluxGuidance, the LTXV / HunyuanVideo / SD3 latent nodes, SaveWEBM, ...) are
registered as `nodes.init_extra_nodes` does (`comfy_support.load_extra_nodes`).

Each workflow (ComfyUI's API "prompt" format) is then checked by ComfyUI's own
`execution.validate_prompt` against the installed node set. Loader nodes only accept files
that exist, so the test registers temporary model folders with
`folder_paths.add_model_folder_path` (and a temporary input directory for LoadImage) and
creates EMPTY PLACEHOLDER FILES there with the names the workflows use; validation never
opens them. Deliberately broken copies of each workflow (a threshold out of range, an
unknown mode, a missing input, a link of the wrong type, a node that does not exist, a
model file that is not there) must fail validation with the matching error.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import comfy_support

nodes = comfy_support.require_nodes()
comfy_support.load_extra_nodes()

import execution  # noqa: E402
import folder_paths  # noqa: E402

WORKFLOWS_DIR = comfy_support.ROOT / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
PACK_NODES = {"WavepassApplyFirstBlockCache": "Apply First Block Cache",
              "WavepassCompileModelPlus": "Compile Model+"}
FBCACHE, COMPILE = PACK_NODES

# Which folder each file-choosing loader input lists (None: ComfyUI's input directory).
FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("LoadImage", "image"): None,
}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


def placeholder_files(workflow: dict) -> list[tuple[str | None, str]]:
    """(folder, file name) of every file a loader node of `workflow` chooses."""
    return [(FILE_INPUTS[(n["class_type"], key)], value)
            for n in workflow.values() for key, value in n["inputs"].items()
            if (n["class_type"], key) in FILE_INPUTS]


@pytest.fixture(scope="module")
def pack_loaded() -> bool:
    """Load the pack as ComfyUI loads a custom node folder (once per module)."""
    return asyncio.run(nodes.load_custom_node(str(comfy_support.ROOT)))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, pack_loaded):
    """Temporary model folders and input directory holding empty placeholder files for every
    file the workflows name; ComfyUI's folder settings are restored afterwards."""
    root = tmp_path_factory.mktemp("comfy_models")
    saved_paths = {k: (list(v[0]), v[1]) for k, v in folder_paths.folder_names_and_paths.items()}
    saved_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root / "input"))
    for name in WORKFLOWS:
        for folder, filename in placeholder_files(load_workflow(name)):
            directory = root / (folder or "input")
            directory.mkdir(exist_ok=True)
            (directory / filename).touch()
            if folder is not None:
                folder_paths.add_model_folder_path(folder, str(directory))
    folder_paths.filename_list_cache.clear()
    yield root
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved_paths)
    folder_paths.set_input_directory(saved_input)
    folder_paths.filename_list_cache.clear()


def validate(workflow: dict) -> tuple[bool, dict, dict]:
    """ComfyUI's own validation: (valid, error, node_errors)."""
    valid, error, _outputs, node_errors = asyncio.run(
        execution.validate_prompt("wavepass-test", workflow, None))
    return valid, error, node_errors


def errors_at(error: dict, node_errors: dict, ids: list[str]) -> set[str]:
    """The error types validation reported for the nodes `ids`."""
    found = {e["type"] for i in ids for e in node_errors.get(i, {}).get("errors", [])}
    if error.get("extra_info", {}).get("node_id") in ids:
        found.add(error["type"])
    return found


def node_ids(workflow: dict, class_type: str) -> list[str]:
    return [i for i, n in workflow.items() if n["class_type"] == class_type]


def upstream(workflow: dict, node_id: str) -> set[str]:
    """The class types of every node `node_id` depends on through links."""
    seen, todo = set(), [node_id]
    while todo:
        for value in workflow[todo.pop()]["inputs"].values():
            if isinstance(value, list) and value[0] not in seen:
                seen.add(value[0])
                todo.append(value[0])
    return {workflow[i]["class_type"] for i in seen}


def test_pack_loads_through_load_custom_node(pack_loaded):
    assert pack_loaded is True
    for node_id, display_name in PACK_NODES.items():
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display_name


def test_eight_demo_workflows():
    assert WORKFLOWS == sorted(["flux1-dev", "flux-controlnet", "ltxv", "hunyuan-video", "sd35", "sdxl",
                                "wan22-two-experts", "flux-two-gpus"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_validates(name, model_files):
    workflow = load_workflow(name)
    valid, error, node_errors = validate(workflow)
    assert valid, (error, node_errors)
    assert node_errors == {}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_output_runs_through_both_pack_nodes(name, pack_loaded):
    workflow = load_workflow(name)
    outputs = [i for i, n in workflow.items()
               if getattr(nodes.NODE_CLASS_MAPPINGS[n["class_type"]], "OUTPUT_NODE", False)]
    assert outputs
    for output in outputs:
        assert set(PACK_NODES) <= upstream(workflow, output), f"output {output} bypasses the pack"


# Each breakage changes a workflow in place and returns the ids of the nodes it broke.

def _set_input(class_type: str, key: str, value) -> Callable[[dict], list[str]]:
    def breaks(workflow: dict) -> list[str]:
        ids = node_ids(workflow, class_type)
        for i in ids:
            workflow[i]["inputs"][key] = value
        return ids
    return breaks


def _drop_input(class_type: str, key: str) -> Callable[[dict], list[str]]:
    def breaks(workflow: dict) -> list[str]:
        ids = node_ids(workflow, class_type)
        for i in ids:
            del workflow[i]["inputs"][key]
        return ids
    return breaks


def _link_conditioning_as_model(workflow: dict) -> list[str]:
    """Feed a cache node's MODEL input from a text encoder (a CONDITIONING output)."""
    fbcache = node_ids(workflow, FBCACHE)[0]
    workflow[fbcache]["inputs"]["model"] = [node_ids(workflow, "CLIPTextEncode")[0], 0]
    return [fbcache]


def _make_cycle(workflow: dict) -> list[str]:
    """Feed a cache node from the compile node that it feeds."""
    fbcache = node_ids(workflow, FBCACHE)[0]
    (compiled,) = (i for i in node_ids(workflow, COMPILE) if workflow[i]["inputs"]["model"] == [fbcache, 0])
    workflow[fbcache]["inputs"]["model"] = [compiled, 0]
    return [fbcache, compiled]


def _rename_node(workflow: dict) -> list[str]:
    compiled = node_ids(workflow, COMPILE)[0]
    workflow[compiled]["class_type"] = "WavepassCompileModelPlusPlus"
    return [compiled]


def _missing_model_file(workflow: dict) -> list[str]:
    loader = next(i for i, n in workflow.items()
                  if any((n["class_type"], key) in FILE_INPUTS for key in n["inputs"]))
    for key in workflow[loader]["inputs"]:
        if (workflow[loader]["class_type"], key) in FILE_INPUTS:
            workflow[loader]["inputs"][key] = "not-downloaded.safetensors"
    return [loader]


BREAKAGES = {
    "threshold above max": (_set_input(FBCACHE, "residual_diff_threshold", 1.5), "value_bigger_than_max"),
    "negative end": (_set_input(FBCACHE, "end", -0.5), "value_smaller_than_min"),
    "unknown mode": (_set_input(COMPILE, "mode", "turbo"), "value_not_in_list"),
    "missing threshold": (_drop_input(FBCACHE, "residual_diff_threshold"), "required_input_missing"),
    "wrong link type": (_link_conditioning_as_model, "return_type_mismatch"),
    "dependency cycle": (_make_cycle, "dependency_cycle"),
    "unknown node": (_rename_node, "missing_node_type"),
    "missing model file": (_missing_model_file, "value_not_in_list"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_broken_workflow_fails_validation(name, breakage, model_files):
    workflow = copy.deepcopy(load_workflow(name))
    breaks, expected = BREAKAGES[breakage]
    broken = breaks(workflow)
    valid, error, node_errors = validate(workflow)
    assert not valid
    assert expected in errors_at(error, node_errors, broken), (error, node_errors)


def test_placeholders_are_empty_files(model_files):
    files = [p for p in Path(model_files).rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size == 0 for p in files)
