"""Continuous batching for the fused GroupQueryAttention export, driven directly through onnxruntime.

Why not onnxruntime-genai's own `og.Engine` (0.18): on a graph without PagedAttention it takes its static
path, which batches at most 4 requests, lets no request join a running batch, and reads full-sequence
logits, so it fails on the fused export (whose lm_head runs on the last position only: "Got invalid
dimensions for output: logits ... Got: 8 Expected: 1"). On a copy of the export with the full lm_head it
ran, slower than one generator per request (measured: benchmarks/bench_ort_batching.py). Its dynamic path
needs a PagedAttention graph, which the CPU provider does not run.

What the fused graph already supports is enough: GroupQueryAttention reads each row's length from the
attention mask (seqlens_k = sum(mask) - 1), writes the new key/value at that position of a shared
past/present buffer and applies rotary at that position. So rows of different lengths share one decode
step with a right-padded mask and nothing else:

- one scheduler thread owns the onnxruntime session; `submit` queues a request, the thread answers
  through the request's own chunk queue (the same shape as backends/torch/batching.py);
- the KV cache is one buffer per layer and kind, [rows, kv_heads, length, head_size]; row i of the buffer
  is `rows[i]`. Requests that arrive together are prefilled together, right-padded, straight into the next
  free rows of that buffer, each without its last prompt token: the pruned lm_head has logits for the
  batch's last position only, so a shorter prompt's first new token comes from its first decode step,
  which feeds that last token beside the running rows. A request alone takes the same path, so what shares
  its prefill never changes its numbers (GroupQueryAttention's right-padded prefill writes each row's cache
  exactly as a prefill of that row alone does);
- a finished or cancelled row leaves at once: the last row's used cache moves into its place, so the
  running rows stay rows [0, n) and each step binds views of the buffers (no copy per step);
- the buffers grow (rows doubling, length by a quarter or more, in blocks of KV_BLOCK) when a joining
  request or a longer sequence needs it, and are dropped when no request runs;
- each row chooses its token on the host from its own logits: its own greedy/temperature/top-k/top-p,
  repetition penalty over prompt and output, EOS banned before min_tokens, and its own seeded
  numpy Generator, so what shares the batch never changes a sampled row's draws;
- TokenStream (backends/stream.py) decides text, stops, EOS and limits, as on every path.

Failure isolation: a failing prefill fails that request only (a shared prefill that fails is retried one
prompt at a time); a failing decode step fails the rows of that step (one forward for all of them) and the
loop carries on; a row whose logits are not finite, or whose token cannot be streamed, fails alone.

Numerics: a batch of M rows runs M-row kernels. The rows kernel (backends/ort_genai/kernels, the default
export's int8-compute MatMulNBits where it is built), onnxruntime's MatMulNBits with int8 compute and plain
fp32 MatMul give each row exactly what it gets alone; MatMulNBits with fp32 compute (the MLP of the "lean"
memory preset) sums in a different order for M > 1 (differences ~1e-6 that the next int8-compute layer can
round into another bucket), so there a greedy stream in a batch can leave its one-at-a-time path at a near
tie. A request served by og generators (batching off) prefills its whole prompt at once; the split here
changes its last position's logits by ~3e-5 on an fp32 export, more on an int4 one. Measured
numbers: benchmarks/bench_ort_batching.py.
"""

from __future__ import annotations

import json
import logging
import queue
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import SamplingParams, TokenLogprob
from backends.detok import StreamDecoder
from backends.memory import LOAD_KV_TOKENS
from backends.ort_genai.resident import release_weight_pages
from backends.runner import BatchRunnerBase
from backends.stream import TokenStream, token_logprob

log = logging.getLogger(__name__)

KV_BLOCK = 64
"""The KV buffers' length is a multiple of this many positions; it grows by at least a quarter each time, so a
long generation reallocates (and copies the running rows) a logarithmic number of times."""

STATIC_PIPELINE_REASON = (
    "a static-shape NPU package (batch-1 context and iterator graphs): one stream at a time; "
    "further requests wait in the engine's queue"
)
"""Why an HTP (decoder-pipeline) package is not batched: its graphs are compiled for batch 1, and a static batch
dimension would need a context binary per batch size (docs/fused-export.md, "Serving")."""

PREFILL_TOKENS = LOAD_KV_TOKENS
"""Padded tokens one shared prefill may hold: the backend's activation allowance covers one prompt's prefill of
min(context, LOAD_KV_TOKENS) tokens (backends/ort_genai/memory.py)."""

NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this request, so no token could be chosen; "
    "this request was dropped and the backend carries on"
)

# ---- which graphs this runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """The names and shapes one decode step binds, read from genai_config.json and the graph."""

    model_file: Path
    input_ids: str
    attention_mask: str
    logits: str
    past: tuple[tuple[str, str], ...]  # per layer: (past key, past value) input names
    present: tuple[tuple[str, str], ...]  # per layer: (present key, present value) output names
    kv_heads: int
    head_size: int
    kv_dtype: Any  # numpy dtype of the cache


@dataclass(frozen=True)
class GraphInput:
    """One graph input as a runtime reports it: name, numpy element type (None: other) and dims."""

    name: str
    dtype: Any
    dims: tuple[int | str | None, ...]


def batch_plan(model_dir: Path) -> tuple[GraphSpec | None, str]:
    """What genai_config.json and the graph's ops say: a spec whose KV dtype is still unknown (None), or
    (None, why not). Reads no weights and does not import onnx: `graph_spec` completes it from the inputs."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"genai_config.json unreadable ({exc})"
    model_cfg = config.get("model", {})
    decoder = model_cfg.get("decoder", {})
    if model_cfg.get("type") == "decoder-pipeline":
        return None, STATIC_PIPELINE_REASON
    if decoder.get("sliding_window"):
        return None, "a sliding-window (static-shape) decoder"
    if not config.get("search", {}).get("past_present_share_buffer"):
        return None, "the export does not share its past/present KV buffer (not the fused graph)"
    inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
    layers = int(decoder.get("num_hidden_layers") or 0)
    try:
        past = tuple((inputs["past_key_names"] % i, inputs["past_value_names"] % i) for i in range(layers))
        present = tuple((outputs["present_key_names"] % i, outputs["present_value_names"] % i) for i in range(layers))
        names = (inputs["input_ids"], inputs["attention_mask"], outputs["logits"])
    except (KeyError, TypeError) as exc:
        return None, f"genai_config.json lacks the decoder's input/output names ({exc})"
    model_file = model_dir / str(decoder.get("filename") or "model.onnx")
    if not layers or not model_file.is_file():
        return None, "no single decoder graph"
    # An op type is a plain string in the protobuf; the weights live in the .data file, so this reads ~0.3 MB.
    if b"GroupQueryAttention" not in model_file.read_bytes():
        return None, "the graph has no GroupQueryAttention (per-row lengths need it)"
    kv_heads = int(decoder.get("num_key_value_heads") or 0)
    head_size = int(decoder.get("head_size") or 0)
    return GraphSpec(model_file, names[0], names[1], names[2], past, present, kv_heads, head_size, None), ""


def graph_spec(plan: GraphSpec, graph_inputs: list[GraphInput]) -> tuple[GraphSpec | None, str]:
    """`plan` completed from the graph's inputs (KV dtype, sizes), or (None, why they do not fit a decode step)."""
    by_name = {i.name: i for i in graph_inputs}
    expected = {plan.input_ids, plan.attention_mask, *(n for pair in plan.past for n in pair)}
    if set(by_name) != expected:
        extra = sorted(set(by_name) - expected)
        return None, f"the graph's inputs are not the ones a decode step binds (extra: {extra})"
    first = by_name[plan.past[0][0]]
    if first.dtype is None or len(first.dims) != 4:
        return None, "an unexpected KV cache layout or type"
    kv_heads = plan.kv_heads or int(first.dims[1])  # type: ignore[arg-type]
    head_size = plan.head_size or int(first.dims[3])  # type: ignore[arg-type]
    return replace(plan, kv_heads=kv_heads, head_size=head_size, kv_dtype=first.dtype), ""


def session_inputs(session: Any) -> list[GraphInput]:
    """An onnxruntime session's inputs as GraphInputs."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return [GraphInput(i.name, types.get(i.type), tuple(i.shape)) for i in session.get_inputs()]


def batchable_graph(model_dir: Path) -> tuple[GraphSpec | None, str]:
    """The graph spec when this export can be batched here, else (None, why not); reads the graph with onnx
    (the backend reads the same inputs from its session instead, `session_inputs`)."""
    plan, why = batch_plan(model_dir)
    if plan is None:
        return None, why
    import onnx

    graph = onnx.load(str(plan.model_file), load_external_data=False).graph
    types = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
    inputs = [
        GraphInput(
            i.name,
            types.get(i.type.tensor_type.elem_type),
            tuple(d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim),
        )
        for i in graph.input
    ]
    return graph_spec(plan, inputs)


# ---- per-request state ------------------------------------------------------------------------------------


@dataclass
class Work:
    """One request in flight: prompt, settings, token stream, output queue, and its row's state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: TokenStream
    eos_ids: frozenset[int] = frozenset()
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    rng: np.random.Generator | None = None
    seen: np.ndarray | None = None  # [vocab] bool: tokens of prompt and output, for the repetition penalty
    length: int = 0  # positions of this row in the KV cache
    last: int = 0  # the token the next step feeds
    done: bool = False
    cancelled: bool = False  # set by `cancel`: chunks already queued are not delivered any more

    def banned(self) -> list[int]:
        return self.params.banned_ids(self.eos_ids, len(self.stream.generated))


def make_work(
    request_id: str, prompt_ids: list[int], params: SamplingParams, eos_ids: frozenset[int], decoder: StreamDecoder
) -> Work:
    """The per-request state: its TokenStream and, when sampling, its own generator (seeded when asked)."""
    stream = TokenStream(request_id, len(prompt_ids), params, eos_ids, decoder)
    rng = None if params.is_greedy else np.random.default_rng(params.seed)
    return Work(request_id, list(prompt_ids), params, stream, eos_ids, rng=rng)


def choose(logits: np.ndarray, w: Work) -> int | None:
    """The row's next token from its last-position logits [vocab] under its own settings; None if not finite."""
    params = w.params
    row = logits
    banned = [t for t in w.banned() if t < row.shape[-1]]
    penalty = params.repetition_penalty
    if banned or penalty != 1.0 or not params.is_greedy:
        row = row.astype(np.float64)  # a copy: the raw logits stay intact for logprobs
    if penalty != 1.0:
        if w.seen is None:
            w.seen = np.zeros(row.shape[-1], dtype=bool)
            w.seen[[t for t in w.prompt_ids if t < row.shape[-1]]] = True
        picked = row[w.seen]
        row[w.seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    if banned:
        row[banned] = -np.inf
    top = row.max()
    if not np.isfinite(top):
        return None
    if params.is_greedy:
        return int(row.argmax())
    assert w.rng is not None
    row = row / params.temperature
    k = params.top_k
    candidates = np.argpartition(-row, k - 1)[:k] if 0 < k < row.shape[-1] else np.arange(row.shape[-1])
    candidates = candidates[np.argsort(-row[candidates], kind="stable")]
    probs = np.exp(row[candidates] - row[candidates[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        cumulative = np.cumsum(probs)
        keep = min(int(np.searchsorted(cumulative, params.top_p)) + 1, len(probs))  # smallest prefix reaching top_p
        probs = probs[:keep] / cumulative[keep - 1]
        candidates = candidates[:keep]
    draw = w.rng.random()
    index = min(int(np.searchsorted(np.cumsum(probs), draw, side="right")), len(candidates) - 1)
    return int(candidates[index])


# ---- the KV cache of the running rows ---------------------------------------------------------------------


class KVStore:
    """One [rows, kv_heads, length, head_size] buffer per layer and kind; rows [0, n) are the running ones."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self.rows = 0
        self.length = 0
        self.buffers: list[np.ndarray] = []  # layer-major: key0, value0, key1, value1, ...
        self._views: dict[tuple[int, int], list[Any]] = {}
        self.bindings: dict[int, Any] = {}  # rows -> an io_binding with rows [0, rows) of the cache bound

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def ensure(self, rows: int, length: int, used_rows: int) -> None:
        """Room for `rows` rows of `length` positions, keeping the first `used_rows` rows' contents."""
        if rows <= self.rows and length <= self.length:
            return
        new_rows = max(rows, self.rows * 2 if rows > self.rows else self.rows, 1)
        if length > self.length:
            length = max(length, self.length + self.length // 4)
        new_length = max(self.length, -(-length // KV_BLOCK) * KV_BLOCK)
        shape = (new_rows, self.spec.kv_heads, new_length, self.spec.head_size)
        fresh = [np.zeros(shape, dtype=self.spec.kv_dtype) for _ in range(2 * len(self.spec.past))]
        if used_rows and self.buffers:
            for old, new in zip(self.buffers, fresh, strict=True):
                new[:used_rows, :, : self.length] = old[:used_rows]
        self.buffers, self.rows, self.length = fresh, new_rows, new_length
        self._views.clear()
        self.bindings.clear()
        log.debug("KV buffers now %d rows x %d positions (%.1f MB)", new_rows, new_length, self.nbytes / 2**20)

    def views(self, start: int, stop: int) -> list[Any]:
        """OrtValues over rows [start, stop) of every buffer (no copy; the same memory is past and present)."""
        key = (start, stop)
        views = self._views.get(key)
        if views is None:
            from onnxruntime import OrtValue

            views = [OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]
            if start == 0:
                self._views[key] = views
        return views

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions into row `dst`."""
        for b in self.buffers:
            b[dst, :, :length] = b[src, :, :length]

    def release(self) -> None:
        self.buffers, self.rows, self.length = [], 0, 0
        self._views.clear()
        self.bindings.clear()


# ---- the scheduler thread ---------------------------------------------------------------------------------


def prefill_groups(waiting: list[Work], budget: int) -> list[list[Work]]:
    """Waiting requests in arrival order, cut into shared prefills of at most `budget` padded tokens (rows x the
    longest prompt), so one call's activations stay within the allowance reserved for one prompt's prefill."""
    groups: list[list[Work]] = []
    current: list[Work] = []
    longest = 0
    for w in waiting:
        width = max(len(w.prompt_ids) - 1, longest)
        if current and width * (len(current) + 1) > budget:
            groups.append(current)
            current, width = [], len(w.prompt_ids) - 1
        current.append(w)
        longest = width
    if current:
        groups.append(current)
    return groups


class OrtBatchRunner(BatchRunnerBase):
    """Owns one onnxruntime session on the fused graph; runs every admitted request in shared decode steps."""

    thread_name = "ort-batch-scheduler"
    runtime = "the onnxruntime-genai backend"

    def __init__(self, session: Any, spec: GraphSpec, *, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self.session = session
        self.spec = spec
        # the session is open: the weight-file pages it keeps mapped but no longer reads go back (resident.py)
        self.released = release_weight_pages(sorted(spec.model_file.parent.glob("*.data")))
        self.kv = KVStore(spec)
        self.rows: list[Work] = []

    # ---- scheduler thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.rows and self.kv.rows:
                    self.kv.release()  # nothing runs: give the cache's memory back before waiting
                self._admit()
                if self._stopping:
                    break
                self._drop_cancelled()
                if self.rows:
                    self._step()
        except Exception as e:  # a bug in the loop: end every stream with the reason rather than hang them
            log.exception("onnxruntime batch scheduler crashed")
            self._crashed(f"scheduler crashed: {e}")

    def _release(self) -> None:
        self.kv.release()

    def _admit(self) -> None:
        """Prefill every request submitted since the last step, together (block while nothing runs)."""
        block = not self.rows
        waiting: list[Work] = []
        while not self._stopping:
            try:
                w = self._incoming.get(block=block)
            except queue.Empty:
                break
            block = False
            if w is None:
                return  # stopping: stop() ends every known request, these too
            if self._take_cancel(w.request_id):
                self._end(w, "cancelled")
                continue
            waiting.append(w)
        for group in prefill_groups(waiting, PREFILL_TOKENS):
            self._prefill(group)

    def _bind(self, kv: list[Any]) -> Any:
        binding = self.session.io_binding()
        binding.bind_output(self.spec.logits)  # the first output: get_outputs()[0]
        names = (n for pair in self.spec.past for n in pair)
        outs = (n for pair in self.spec.present for n in pair)
        for name, out, value in zip(names, outs, kv, strict=True):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(out, value)
        return binding

    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, kv: list[Any]) -> np.ndarray:
        """One run of the graph with the cache bound in place; returns last-position logits [rows, vocab].

        The cache's bindings for rows [0, n) are kept while the buffers stay (a step rebinds two inputs)."""
        rows, step = input_ids.shape[0], input_ids.shape[1] == 1
        reuse = step and kv is self.kv.views(0, rows)  # a prefill's logits may have another shape: fresh binding
        binding = self.kv.bindings.get(rows) if reuse else None
        if binding is None:
            binding = self._bind(kv)
            if reuse:
                self.kv.bindings[rows] = binding
        from onnxruntime import OrtValue

        feeds = (OrtValue.ortvalue_from_numpy(input_ids), OrtValue.ortvalue_from_numpy(mask))
        binding.bind_ortvalue_input(self.spec.input_ids, feeds[0])
        binding.bind_ortvalue_input(self.spec.attention_mask, feeds[1])
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits[:, -1, :]

    def _prefill(self, group: list[Work]) -> None:
        """Prefill prompts together into the next free rows, right-padded, each without its last token; that
        token is the row's first decode step, shared with the running rows, whose logits give the first new
        token. Every prompt takes this path, alone too, so a request computes the same numbers whatever shares
        its prefill and its steps (GroupQueryAttention reads each row's length from the mask)."""
        heads = [w for w in group if len(w.prompt_ids) > 1]  # a one-token prompt has nothing to prefill
        if heads and not self._prefill_rows(heads):
            if len(heads) > 1:  # one shared call failed: alone, each prompt fails or succeeds on its own
                for w in heads:
                    if self._prefill_rows([w]):
                        self._join(w)
            heads = []
        for w in heads:
            self._join(w)
        singles = [w for w in group if len(w.prompt_ids) <= 1]
        if singles:
            try:  # their rows need cache room too, though nothing is prefilled into them
                self.kv.ensure(len(self.rows) + len(singles), 1, len(self.rows))
            except Exception as e:
                for w in singles:
                    self._fail(w, f"no room in the KV cache for this request: {e}")
                singles = []
        for w in singles:
            self._join(w)

    def _join(self, w: Work) -> None:
        """A prefilled request takes the next row; its last prompt token is what the next step feeds."""
        if not w.prompt_ids:
            self._fail(w, "the prompt has no tokens; send at least one")
            return
        w.length = len(w.prompt_ids) - 1
        w.last = w.prompt_ids[-1]
        self.rows.append(w)
        self.peak_batch = max(self.peak_batch, len(self.rows))

    def _prefill_rows(self, ws: list[Work]) -> bool:
        """One forward of `ws`' prompts but their last tokens into rows [n, n + len(ws)); False when it failed
        (each request then failed with the reason, unless several shared the call: the caller retries them)."""
        n, widths = len(self.rows), [len(w.prompt_ids) - 1 for w in ws]
        width = max(widths)
        try:
            self.kv.ensure(n + len(ws), width + 1, n)
            ids = np.zeros((len(ws), width), dtype=np.int64)
            mask = np.zeros((len(ws), width), dtype=np.int64)
            for i, (w, p) in enumerate(zip(ws, widths, strict=True)):
                ids[i, :p] = w.prompt_ids[:-1]
                mask[i, :p] = 1
            self._forward(ids, mask, self.kv.views(n, n + len(ws)))  # the logits of a padded row mean nothing
        except Exception as e:
            if len(ws) > 1:
                log.warning("a shared prefill of %d prompts failed, retrying them one by one: %s", len(ws), e)
                return False
            log.warning("prefill of request %s failed", ws[0].request_id, exc_info=e)
            self._fail(ws[0], f"onnxruntime failed on the prompt ({widths[0] + 1} tokens): {e}")
            return False
        return True

    def _step(self) -> None:
        rows = self.rows
        n = len(rows)
        lengths = np.fromiter((w.length for w in rows), dtype=np.int64, count=n)
        width = int(lengths.max()) + 1
        try:
            self.kv.ensure(n, width, n)
            ids = np.fromiter((w.last for w in rows), dtype=np.int64, count=n).reshape(n, 1)
            mask = (np.arange(width, dtype=np.int64)[None, :] <= lengths[:, None]).astype(np.int64)
            logits = self._forward(ids, mask, self.kv.views(0, n))
        except Exception as e:  # one forward for all rows: they share the failure, the loop carries on
            log.exception("decode step failed")
            self.last_error = str(e)
            for w in rows:
                self._fail(w, f"a decode step with {n} sequences failed: {e}")
            self.rows = []
            return
        self.steps += 1
        finished = []
        for i, w in enumerate(rows):
            w.length += 1
            if self._accept(w, logits[i]):
                finished.append(i)
        self._remove_rows(finished)

    def _accept(self, w: Work, logits: np.ndarray) -> bool:
        """Choose and stream the row's next token; True when the request is finished (or failed)."""
        try:
            token = choose(logits, w)
            if token is None:
                self._fail(w, NON_FINITE)
                return True
            logprob: TokenLogprob | None = None
            if w.params.logprobs is not None:
                logprob = token_logprob(logits, token, w.params.logprobs)
            chunk = w.stream.push(token, logprob)
        except Exception as e:  # e.g. the tokenizer cannot decode an id the model produced
            log.warning("choosing or streaming a token failed for request %s: %s", w.request_id, e)
            self._fail(w, f"choosing or streaming the next token failed: {e}; this request was dropped")
            return True
        if w.seen is not None and token < w.seen.shape[0]:
            w.seen[token] = True
        w.last = token
        if chunk.finish_reason is not None:
            self._finish(w, chunk)
            return True
        w.out.put(chunk)
        return False

    def _remove_rows(self, indices: list[int]) -> None:
        """Drop rows; the last running row's cache moves into each hole, so rows [0, n) stay the running ones."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.kv.move(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()
