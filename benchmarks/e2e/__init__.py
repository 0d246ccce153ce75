"""End-to-end speed of the engine against Hugging Face full attention: prefill, decode, memory, time split.

    python -m benchmarks.bench_e2e --model llama3-8b-random --lengths 32768 131072 \\
        --decode-lengths 8192 32768 131072 --modes ltri full --backend auto --time-limit 520 \\
        --out benchmarks/results/e2e_h200

What it measures, for every model, context length and mode, side by side in one run on the same random token ids:

* **Prefill**: one timed prefill (``torch.cuda.synchronize()`` on both sides, after one short warm-up per mode) of a
  fresh :class:`~ltri_rag.LtriSession` (``--prefill-repeats N``: N reads, each by a fresh session, the median kept
  with every time in ``repeat_seconds``: the engine's prompts are host-bound and one read can be 20% off):
  seconds, tokens/s, peak GPU memory (``max_memory_allocated`` after ``reset_peak_memory_stats``, weights
  included) and the host process's resident memory (the span memory of
  ``infllm`` / ``ltri`` lives in pinned host memory). ``full`` is the engine's ``full`` mode, which is the plain
  Hugging Face forward (``attn_implementation="sdpa"``, ``DynamicCache``, the whole prompt in one pass, logits of
  the last token only); ``--sdpa-backend`` pins SDPA to flash / cuDNN / efficient (default: torch's own choice).
  ``streaming`` / ``infllm`` / ``ltri`` run through the engine with the default :class:`~ltri_rag.LtriConfig` sizes
  (``--window`` / ``--budget`` / ``--chunk`` / ``--sinks`` change them) and ``attention_backend=--backend``.
* **Decode**: after the prefill at each ``--decode-lengths`` length, ``--decode-tokens`` greedy single-token
  ``session.step`` calls, each timed alone (synchronised); median (and mean, min, max) ms/token and the peak GPU
  memory while decoding. The ``full`` row is Hugging Face eager decoding with a ``DynamicCache`` (the weak
  baseline; the strong one, ``StaticCache`` + CUDA graph, is not run here: its numbers from
  ``../shared/performance.md`` are printed as a reference).
* **Time split** (``--no-profile`` skips it): at each decode length, one decode step and one prefill chunk (a full
  ``chunk_size`` pass over that context, ``infllm`` / ``ltri`` / ``streaming`` only) under ``torch.profiler``. The
  profiler is stepped from a forward pre-hook on the model, so exactly one model pass (with the engine's
  ``commit`` that follows it) is recorded. Device time (CUDA) or CPU time is split into: attention, retrieval
  (score + select, gather from the pool, assembling the memory part), memory upkeep (absorb, evict, segment,
  store), weights (the linear layers), copies, other, by the engine's ``record_function`` labels
  (:data:`benchmarks.profile_engine.STAGES`) and operator names. Each is set against the floors: weight bytes (+ the
  K/V the step must read) / ``--hbm-tbps`` for a decode step, FLOPs / ``--peak-tflops`` for prefill.

Isolation: on CUDA each mode runs in a process of its own and the rows are merged (each mode's own result stays
under ``--out``/``modes``; ``--isolate on`` / ``off`` forces it either way, ``auto`` is the default). In a shared
process a mode can be slowed by the ones before it: in session 24 the second of two identical 128K modes decoded
2-4 ms per token slower (:mod:`benchmarks.e2e.isolate`). Isolated, each mode runs every length in turn within an
equal share of the time left. ``--rounds N`` runs every mode N times, each in a process of its own, the order rotated
each round (each mode first once in every ``len(modes)`` rounds); the tables hold the medians over the rounds and the
report lists each round (:mod:`benchmarks.e2e.rounds`): in session 34 the first of three processes still prefilled
128K 0.7-3.0 s slower than the later ones, in the same order in two calls.

Budget: ``--time-limit`` bounds the whole run. Lengths run in increasing order, each length for every mode (in
``--modes`` order) before the next, so every system gets the short lengths. A (model, mode) skips a length when its
time at the last smaller length, scaled by the growth measured so far (default exponent 2 for ``full``, 1.15 for
the engine), exceeds the time left; after an OOM or an error at a smaller length; or when the span memory would not
fit in host memory (``--host-mem-gib``; torch's pinned-memory cache keeps the buffers the pool grew out of, so the
estimate is twice the pool). A pass still running at the time limit is stopped between layers (status ``stopped``).
Every skip records why. ``torch.OutOfMemoryError`` records ``OOM``, frees memory and carries on.

Random weights make what retrieval finds meaningless (there is no needle to find, attention maps are near
uniform), which is fine for speed: every mode does the same work per token as on a real model, except that the
number and length of ``ltri``'s semantic spans depend on the attention maps. Built-in models (random bf16 weights
drawn on the device by a seeded generator, no float32 copy on the host): ``llama3-8b-random`` (Llama-3-8B shape:
32 layers, hidden 4096, 32 / 8 heads, MLP 14336, vocab 128256, rope theta 500000) and ``qwen2.5-0.5b-random``
(Qwen2.5-0.5B / Coder-0.5B shape). ``--model NAME=PATH`` runs a real model (``ltri_rag.load_model``: Hub id,
directory or ``.gguf``); ``--model`` may be repeated (models run one after the other, sharing ``--time-limit``).

Writes ``bench.json`` (rows and metadata; rewritten after every row, so a killed run keeps what it measured),
``bench.md`` (the Markdown tables, also printed) and ``bench.png`` (prefill seconds vs length, ms/token vs context,
peak GPU memory vs length) under ``--out``. ``--small`` runs a tiny random Llama on CPU: a check that the script
works, not a speed result.
"""

# Modules: models (the models under test), modes (per-mode setup), device (memory figures), budget (time limit and
# skips), floors (FLOP / HBM floors), timesplit (the profiled split), runs (the measurements and the grid), report
# (summary and Markdown), plot (bench.png), isolate (a process per mode), rounds (rotated repeats and their
# medians), cli (options and main). ``python -m benchmarks.bench_e2e`` runs cli.main.
