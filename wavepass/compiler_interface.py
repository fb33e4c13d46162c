"""The compilers a plan is handed to: the one module that touches Inductor's `compile_fx`, the
marks Dynamo leaves on its graphs, unboxing, Inductor's config patches and the C++ bundles
(in the spirit of vLLM's `vllm/compilation/compiler_interface.py`).

A `CompilerInterface` compiles the graphs `pipeline.py` planned for one Dynamo graph:

    with compiler.compiling():                       around every piece of the Dynamo graph
        run = compiler.compile_block(subgraph, floats)   a block graph: run(list) -> outputs
        f = compiler.compile_piece(gm, inputs, floats)   a piece, or a whole graph: f(*args)

`floats`: the float symbols that other pieces of the Dynamo graph read and this graph does
not; they stay symbolic while it compiles (`torch_api.floats_read_elsewhere`), so a Python
float compiles no more graphs than under plain Inductor (issue 29). `compiler_for(options,
mode)` picks the compiler:

- `InductorAdaptor` (compiler="inductor"): each graph through `compile_fx`, in a tracing
  context of its own, with `patches` (ours, the mode's, the user's); a piece's C++ kernels
  built as one library (`cpp_bundle`: Inductor's `AsyncCompile` is patched only inside the
  `compile_fx` call it serves); a block graph run without AOTAutograd's wrappers where they
  would do nothing (`_block_callable`);
- `PlainInductorAdaptor`: a torch without the APIs the core needs
  (`torch_api.core_unavailable_reason`): the graph as `backend="inductor"` would compile it;
- `EagerAdaptor` (compiler="eager"): every graph runs as it is.

What the pipeline plans for a compiler it reads from its attributes: `compiles` (block graphs
and compile accounting apply), `block_config` (what of its configuration a block graph's
name holds), `runs_python_pieces` (a piece of block calls may run as Python) and
`records_cuda_graphs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.fx import GraphModule

from . import torch_api
from .block_op import BLOCKS, call_directly_from_inductor
from .options import CacheOptions
from .passes.fx_facts import example_value

# Inductor checks every input's sizes and strides on every call, also inside every block
# subgraph: thousands of checks a step for a model whose weights are inputs, ~3% of a step of
# the 57-block benchmark model. Dynamo's guards cover the graph's inputs and the runtime
# checks the values passed between pieces (`runtime._check_strides`), so pieces skip them;
# options={"inductor": {"size_asserts": True}} turns them back on.
PIECE_PATCHES = {"size_asserts": False}

BlockRun = Callable[[list[Any]], Sequence[torch.Tensor]]


class CompilerInterface:
    """Compiles the graphs of one Dynamo graph's plan (see the module docstring)."""

    compiles = False
    records_cuda_graphs = False
    runs_python_pieces = False
    block_config: Hashable = ()

    def compiling(self) -> Any:
        """A context around every compile of one Dynamo graph's pieces."""
        return nullcontext()

    def compile_piece(self, gm: GraphModule, example_inputs: Sequence[Any],
                      floats: frozenset[str] = frozenset()) -> Callable[..., Any]:
        raise NotImplementedError

    def compile_block(self, subgraph: GraphModule, floats: frozenset[str] = frozenset()) -> BlockRun:
        raise NotImplementedError


class EagerAdaptor(CompilerInterface):
    """compiler="eager": the cached program runs every graph as it is (debugging, fast tests)."""

    def compile_piece(self, gm: GraphModule, example_inputs: Sequence[Any],
                      floats: frozenset[str] = frozenset()) -> Callable[..., Any]:
        return gm


class PlainInductorAdaptor(CompilerInterface):
    """A torch whose internals wavepass cannot use: each graph as `backend="inductor"` compiles
    it, with the mode's and the user's patches as far as this torch can say them."""

    def __init__(self, options: CacheOptions, mode: str | None) -> None:
        try:
            self.patches = inductor_patches(options, mode)
        except torch_api.Missing:
            self.patches = dict(options.inductor)

    def compile_piece(self, gm: GraphModule, example_inputs: Sequence[Any],
                      floats: frozenset[str] = frozenset()) -> Callable[..., Any]:
        plain = torch_api.plain_inductor(gm, example_inputs, self.patches)
        return plain if plain is gm else _unboxed(plain)


class InductorAdaptor(CompilerInterface):
    """compiler="inductor": every piece and block graph through `compile_fx`."""

    compiles = True

    def __init__(self, options: CacheOptions, mode: str | None) -> None:
        self.patches = inductor_patches(options, mode)
        # a block graph is never recorded as a CUDA graph: the piece calling it may record one
        self.block_patches = {**self.patches, "triton.cudagraphs": False}
        self.block_config = tuple(sorted(self.block_patches.items()))
        self.records_cuda_graphs = _cuda_graphs(self.patches)
        # Under CUDA graphs Inductor compiles even a piece of block calls: the graph recorded
        # around the piece holds the calls' kernels (so a torch that cannot say whether it
        # records them compiles the piece: `python_pieces`)
        self.runs_python_pieces = not self.records_cuda_graphs and torch_api.enabled("python_pieces")
        self.bundles = options.bundle_kernels and torch_api.enabled("bundle_kernels")

    def compiling(self) -> Any:
        """Inside: the kernels of a graph with few kernels wait to be built with the next
        graphs' (`cpp_bundle.batched_builds`)."""
        if not self.bundles:
            return nullcontext()
        from .cpp_bundle import batched_builds

        return batched_builds()

    def compile_piece(self, gm: GraphModule, example_inputs: Sequence[Any],
                      floats: frozenset[str] = frozenset()) -> Callable[..., Any]:
        """`gm` compiled, called as `f(*args)`; its weights static inputs as in Dynamo's own
        graphs (`_mark_dynamo_inputs`), its block calls made by Inductor's code directly."""
        if gm.graph.find_nodes(op="call_function", target=BLOCKS):
            call_directly_from_inductor()
        if torch_api.enabled("static_inputs"):
            _mark_dynamo_inputs(gm)
        return _unboxed(self._compile_fx(gm, example_inputs, self.patches, floats))

    def compile_block(self, subgraph: GraphModule, floats: frozenset[str] = frozenset()) -> BlockRun:
        """A block structure compiled, as the boxed callable `Structure.run` is: Inductor's
        compiled module itself where AOTAutograd's runtime wrappers would do nothing around it.

        A step calls each block graph once per block, and those wrappers (a Dynamo-disabled
        frame, argument flattening, the generated runtime wrapper) cost ~10-15 us a call: 3%
        of a step of the 12-block SD3 benchmark model. They do nothing for a graph on plain
        tensors that mutates no input, returns no alias, uses no effect tokens or
        functionalized RNG (`_runs_bare`), compiled without grad and outside autocast
        (`_compiled_for_inference`). The verdict is read from the artefact this process
        actually runs: the AOTAutograd cache entry it was saved as or loaded from
        (`torch_api.aot_entry`: its runtime metadata and subclass metadata), so a new process
        that loads the block from the cache decides as the process that traced it did, from
        the same entry, and nothing else on disk speaks for it. The bare callable is the
        compiled module at the end of the wrappers' `__wrapped__` chain. Without an entry
        (the AOTAutograd cache off), the metadata of the trace in this process decides; where
        neither is there, or the chain ends elsewhere, or on a torch without the APIs this
        needs (`bare_block_graphs`), the wrappers run."""
        inputs = [example_value(p) for p in subgraph.graph.find_nodes(op="placeholder")]
        if not torch_api.enabled("bare_block_graphs"):
            unboxed = _unboxed(self._compile_fx(subgraph, inputs, self.block_patches, floats))
            return lambda args: unboxed(*args)
        traced: list[Any] = []  # AOTAutograd's metadata, where it traced the block in this process

        def capture(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
            compiled = torch_api.compile_fx_inner(gm, example_inputs, **kwargs)
            context = torch_api.api("TracingContext.try_get")()
            traced.append(getattr(context, "fw_metadata", None) if context is not None else None)
            return compiled

        wrapped = self._compile_fx(subgraph, inputs, self.block_patches, floats, inner_compile=capture)
        inner = inspect.unwrap(wrapped)
        entry = torch_api.aot_entry(wrapped)
        if entry is not None:
            metadata, subclass = getattr(entry, "runtime_metadata", None), getattr(entry, "maybe_subclass_meta", None)
        else:
            metadata, subclass = (traced[-1] if traced else None), None
        if _compiled_for_inference() and _runs_bare(inner, metadata, subclass, inputs):
            return inner
        unboxed = _unboxed(wrapped)
        return lambda args: unboxed(*args)

    def _compile_fx(self, gm: GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any],
                    floats: frozenset[str], inner_compile: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """compile_fx on one graph, its C++ kernels built as one library (`cpp_bundle`).
        Graphs are compiled on their own, each in a tracing context of its own, so one
        graph's output strides and metadata never leak into another's or Dynamo's."""
        fake_mode = torch_api.fake_mode_of(example_inputs)
        with (self._bundled_cpp_kernels(),
              torch_api.tracing(fake_mode) if fake_mode is not None else nullcontext(),
              torch_api.floats_read_elsewhere(floats) if floats else nullcontext()):
            return torch_api.compile_fx(gm, list(example_inputs),
                                        inner_compile=inner_compile or torch_api.api("compile_fx_inner"),
                                        config_patches=patches)

    @contextmanager
    def _bundled_cpp_kernels(self) -> Iterator[None]:
        """Inductor's `AsyncCompile` patched to build kernels in bundles, for this compile only."""
        if not self.bundles:
            yield
            return
        from .cpp_bundle import bundled_cpp_kernels

        with bundled_cpp_kernels():
            yield


def compiler_for(options: CacheOptions, mode: str | None) -> CompilerInterface:
    """The compiler for `options.compiler` on this torch."""
    if options.compiler == "eager":
        return EagerAdaptor()
    if torch_api.core_unavailable_reason() is not None:  # the backend said why, once
        return PlainInductorAdaptor(options, mode)
    return InductorAdaptor(options, mode)


def inductor_patches(options: CacheOptions, mode: str | None) -> dict[str, Any]:
    """Inductor's config patches for every piece: ours, then the mode's, then the user's."""
    return {**PIECE_PATCHES, **(torch_api.mode_options(mode) if mode else {}), **options.inductor}


def _cuda_graphs(patches: dict[str, Any]) -> bool:
    """Whether Inductor runs the pieces as CUDA graphs (on a CUDA device, e.g. with
    mode="reduce-overhead"): a graph's next replay overwrites the outputs of the last one."""
    if "triton.cudagraphs" in patches:
        return bool(patches["triton.cudagraphs"])
    return bool(torch_api.inductor_setting("triton.cudagraphs", False))


def _runs_bare(compiled: Any, metadata: Any, subclass: Any, inputs: Sequence[Any]) -> bool:
    """Whether AOTAutograd's runtime wrappers pass `inputs` to `compiled` (the end of their
    chain) and its outputs back unchanged (see `InductorAdaptor.compile_block`), by the
    runtime `metadata` (ViewAndMutationMeta) and `subclass` metadata of the graph
    AOTAutograd compiled: one input per input (no duplicate removed, no synthetic base), no
    tensor subclass, no mutated input, no aliased output, no effect tokens, no functionalized
    RNG. Metadata this torch does not have, or none: not bare."""
    output_type = torch_api.api("OutputType")
    try:
        return (isinstance(compiled, torch_api.api("CompiledFxGraph")) and metadata is not None
                and subclass is None
                and not any(isinstance(x, torch.Tensor) and type(x) is not torch.Tensor
                            and not isinstance(x, torch_api.plain_tensor_types()) for x in inputs)
                and len(metadata.input_info) == len(inputs)
                and metadata.num_mutated_inp_runtime_indices == 0
                and metadata.num_intermediate_bases == 0
                and all(o.output_type == output_type.non_alias for o in metadata.output_info)
                and not metadata.tokens and not metadata.is_rng_op_functionalized)
    except AttributeError:  # AOTAutograd's metadata has other fields on this torch
        return False


def _compiled_for_inference() -> bool:
    """No grad, no autocast where the block is compiled. Checked here, outside `compile_fx`:
    inside it AOTAutograd has turned autocast off, so `_runs_bare` cannot see it."""
    return not torch.is_grad_enabled() and not torch_api.api("is_any_autocast_enabled")()


def _mark_dynamo_inputs(gm: GraphModule) -> None:
    """Give a piece of a Dynamo graph the marks Dynamo leaves on its own graphs, as Dynamo's
    DDPOptimizer does for the graphs it splits: the compile id, no lifted parameters, and
    each placeholder's source (None for a value another piece computed). From them
    AOTAutograd knows which inputs are static, the weights among them; under CUDA graphs a
    static input is read where it lies, any other is copied into the graph's memory at
    every replay (all the weights: 10% of a step of a 24-block FLUX on an H200, and their
    size again in memory). The placeholders keep Dynamo's `grapharg` and `tensor_dict`
    metadata (the passes copy node metadata); a graph Dynamo marked itself is left as it is.
    AOTAutograd reads these marks in `_try_get_metadata_from_dynamo` (`static_inputs`)."""
    compile_id = torch_api.api("current_compile_id")()
    if (compile_id is None or "dynamo_compile_id" in gm.meta
            or next(gm.parameters(), None) is not None or next(gm.buffers(), None) is not None):
        return
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        node._dynamo_source = grapharg.source if grapharg is not None else None
    gm.meta["dynamo_compile_id"] = compile_id
    gm._param_name_to_source = {}


def _unboxed(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """compile_fx returns either `f(*args)` or a boxed `f(args_list)`; its `_boxed_call` flag is
    copied onto unboxed wrappers too, so the signature of the callable itself decides."""
    parameters = inspect.signature(compiled, follow_wrapped=False).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return compiled
    return lambda *args: compiled(list(args))
