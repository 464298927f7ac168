"""The worker process: loads the models of one device and serves frames until told to stop.

Started by `meshnode.worker.client.WorkerProcess` as
`python -m meshnode.worker.main --fd N --spec JSON`. Threads: one reads frames into an inbox;
the main thread owns every model and loops: take new work from the inbox, run one batching step
per busy chat model, send what it made, send a heartbeat at least every HEARTBEAT_S. A step that
never returns therefore stops the heartbeats, which is how the node sees a hung worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("meshnode.worker")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    device: str  # auto | cpu | cuda | cuda:N
    data_dir: str
    max_batch: int
    models: tuple[dict[str, Any], ...]  # ModelSpec.to_wire()
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # The engine's options (config.ProviderConfig of the local provider; see engine.py).
    dtype: str = "auto"
    max_len: int = 0
    prefill_chunk: int = 256
    prefix_cache_mb: int = -1
    cuda_graphs: bool = True

    def to_json(self) -> str:
        return json.dumps({
            "device": self.device, "data_dir": self.data_dir, "max_batch": self.max_batch,
            "models": list(self.models), "threads": self.threads, "dtype": self.dtype,
            "max_len": self.max_len, "prefill_chunk": self.prefill_chunk,
            "prefix_cache_mb": self.prefix_cache_mb, "cuda_graphs": self.cuda_graphs,
        })

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        return cls(raw["device"], raw["data_dir"], int(raw["max_batch"]),
                   tuple(raw["models"]), int(raw.get("threads", 0)),
                   str(raw.get("dtype", "auto")), int(raw.get("max_len", 0)),
                   int(raw.get("prefill_chunk", 256)), int(raw.get("prefix_cache_mb", -1)),
                   bool(raw.get("cuda_graphs", True)))

    def engine_options(self) -> Any:
        from meshnode.worker.engine import EngineOptions

        return EngineOptions(max_len=self.max_len, prefill_chunk=self.prefill_chunk,
                             prefix_cache_mb=self.prefix_cache_mb, cuda_graphs=self.cuda_graphs)


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device("cuda:0")
    return torch.device(name)


def _memory_bytes(device: Any) -> int:
    """What this worker holds: on CUDA the allocator's reserved memory (what other processes
    cannot have), not just what live tensors use."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def vocabulary_size(model: Any, tokenizer: Any) -> int:
    """Token ids a client may send are 0 .. this - 1: known to the tokenizer and the model."""
    rows = model.get_input_embeddings().num_embeddings
    return int(min(len(tokenizer), rows))


def fingerprint(path: Path, model: Any) -> str:
    """OpenAI's `system_fingerprint` for answers of one loaded model: it changes when the
    weights' directory, the dtype or the library versions change (what can change the output
    of a seeded request), as OpenAI's changes with its backend configuration."""
    import hashlib

    import torch
    import transformers

    dtype = getattr(model, "dtype", "")
    key = f"{path.resolve()}|{dtype}|{torch.__version__}|{transformers.__version__}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


class Worker:
    def __init__(self, config: WorkerConfig, channel: Any) -> None:
        self.config = config
        self.channel = channel
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.engines: dict[str, Any] = {}
        self.embedders: dict[str, Any] = {}
        self.device: Any = None

    # ------------------------------------------------------------------ start
    def load(self) -> dict[str, dict[str, Any]]:
        from meshnode.worker.embedder import Embedder, max_seq_length
        from meshnode.worker.engine import GenerationEngine
        from meshnode.worker.gguf import dir_bytes
        from meshnode.worker.models import ModelSpec, load_causal_lm, load_encoder, model_dir

        info: dict[str, dict[str, Any]] = {}
        for raw in self.config.models:
            spec = ModelSpec.from_wire(raw)
            started = time.monotonic()
            log.info("loading model %s (%s) from %s", spec.name, spec.kind,
                     f"built-in {spec.builtin!r}" if spec.builtin else spec.path)
            path = model_dir(spec, Path(self.config.data_dir))
            extra: dict[str, Any] = {}
            if spec.kind == "embedding":
                model, tokenizer = load_encoder(path, self.device)
                embedder = Embedder(model, tokenizer, self.device, max_seq_length(path, tokenizer))
                self.embedders[spec.name] = embedder
                context = max_seq_length(path, tokenizer)
                extra["dimensions"] = embedder.dimensions
            else:
                model, tokenizer = load_causal_lm(path, self.device, self.config.dtype)
                engine = GenerationEngine(model, tokenizer, self.device, self.config.max_batch,
                                          self.config.engine_options())
                self.engines[spec.name] = engine
                context = engine.context
            info[spec.name] = {
                "kind": spec.kind, "context": context, "vocab": vocabulary_size(model, tokenizer),
                "fingerprint": fingerprint(path, model), **extra,
            }
            log.info("loaded model %s from %s (%.1f MB) in %.1fs", spec.name, path,
                     dir_bytes(path) / 1e6, time.monotonic() - started)
        return info

    def warm_up(self) -> None:
        """One short pass through every model, so the first request is not the slow one."""
        from meshnode.worker.engine import RequestRejected
        from meshnode.worker.models import encode_prompt
        from meshnode.worker.params import Constraint, SamplingParams
        from meshnode.worker.rates import StepRates

        for embedder in self.embedders.values():
            embedder.embed(["warm up"])
        for engine in self.engines.values():
            ids = encode_prompt(engine.tokenizer, [{"role": "user", "content": "warm up"}], None)
            engine.submit(-1, ids, SamplingParams(max_tokens=2, temperature=1.0, seed=0))
            # The grammar and logprobs paths too: builds the grammar library's view of the
            # vocabulary (about a second for a large one) now rather than on a first request.
            try:
                engine.submit(-2, ids, SamplingParams(max_tokens=2, temperature=1.0, seed=0,
                                                      logprobs=1,
                                                      constraint=Constraint("json_object")))
            except RequestRejected as exc:
                # A tokenizer llguidance cannot read: the model serves, but not constrained.
                log.warning("%s: %s", engine.model.name_or_path, exc.message)
            while engine.has_work():
                engine.step()
            engine.prepare()  # CUDA graphs of the decode step, once the kernels are warm
            # First-call costs are not its speed: the rates start from the first real step.
            engine.rates = StepRates()

    # ------------------------------------------------------------------ serve
    def _reader(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (OSError, ValueError):
                message = None
            self.inbox.put(message)
            if message is None or message.get("t") == "stop":
                return

    def serve(self) -> None:
        from meshnode.worker.engine import ThroughputMeter
        from meshnode.worker.protocol import HEARTBEAT_S

        threading.Thread(target=self._reader, name="worker-reader", daemon=True).start()
        meter = ThroughputMeter()
        last_beat = 0.0
        while True:
            busy = any(e.has_work() for e in self.engines.values())
            timeout = 0.0 if busy else HEARTBEAT_S
            try:
                message = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            except queue.Empty:
                message = {"t": "idle"}
            while True:
                if message is None or message.get("t") == "stop":
                    return
                self._handle(message)
                try:
                    message = self.inbox.get_nowait()
                except queue.Empty:
                    break
            for engine in self.engines.values():
                if engine.has_work():
                    meter.add(self._step(engine))
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                self.channel.send({
                    "t": "hb", "tps": meter.sample(), "mem": _memory_bytes(self.device),
                    "active": sum(e.active_rows for e in self.engines.values()),
                    "queued": sum(e.queued for e in self.engines.values()),
                    "pfx": [h for e in self.engines.values() for h in e.prefix_summary(64)],
                    "rpfx": self._routed_names(),
                    **self._rates(),
                })

    def _rates(self) -> dict[str, float]:
        """The engines' measured prefill tokens/s ("pps") and decode tokens/s per stream
        ("dps"), averaged over the engines that measured them (0.0: none yet)."""
        from meshnode.types import mean_rate

        rates = [e.rates for e in self.engines.values() if hasattr(e, "rates")]
        return {"pps": round(mean_rate(r.prefill_tokens_per_s for r in rates), 1),
                "dps": round(mean_rate(r.decode_tokens_per_s for r in rates), 2)}

    def _routed_names(self) -> bytes:
        """The routing names whose KV the engines hold (most recent first, each engine's in
        turn, at most MAX_NAMES in all), packed as on the gossip wire."""
        from meshnode.routing.prefix import MAX_NAMES, encode_names

        names: list[bytes] = []
        for engine in self.engines.values():
            names += engine.routed_names(MAX_NAMES - len(names))
        return encode_names(names)

    def _step(self, engine: Any) -> int:
        """One engine step, its output sent; returns the tokens it made. Whatever a step raises
        (an out-of-memory is handled inside it) fails that engine's admitted requests, not the
        worker: the rest is served on."""
        try:
            result = engine.step()
        except Exception as exc:  # noqa: BLE001 - the worker must outlive a bad step
            log.exception("engine step failed; failing its admitted requests")
            failed = engine.abort_all(f"the local worker's step failed ({type(exc).__name__})")
            for f in failed:
                self.channel.send({"t": "fail", "id": f.request_id, "message": f.message})
            return 0
        if result.events or result.done:
            self.channel.send({
                "t": "step",
                "ev": [_event_wire(engine, e) for e in result.events],
                "done": [[d.request_id, d.prompt_tokens, d.completion_tokens, d.cached_tokens]
                         for d in result.done],
            })
        for f in result.failed:
            self.channel.send({"t": "fail", "id": f.request_id, "message": f.message})
        return int(result.tokens)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "gen":
            self._generate(message)
        elif kind == "emb":
            self._embed(message)
        elif kind == "cancel":
            for engine in self.engines.values():
                engine.cancel(message["id"])

    def _generate(self, message: dict[str, Any]) -> None:
        from meshnode.worker.engine import RequestRejected
        from meshnode.worker.models import encode_prompt
        from meshnode.worker.params import SamplingParams, ToolSpec

        engine = self.engines.get(message["model"])
        if engine is None:
            self._reject(message["id"], f"model {message['model']!r} is not a text model here",
                         "model")
            return
        try:
            if "prompt_ids" in message:
                ids = list(message["prompt_ids"])
                vocab = vocabulary_size(engine.model, engine.tokenizer)
                if any(not 0 <= t < vocab for t in ids):
                    self._reject(message["id"], f"token ids must be in [0, {vocab})", "prompt")
                    return
            else:
                tools = [ToolSpec.from_wire(t) for t in message.get("tools") or ()]
                ids = encode_prompt(engine.tokenizer, message.get("messages"),
                                    message.get("prompt"), tools or None)
            engine.submit(message["id"], ids, SamplingParams.from_wire(message["params"]),
                          _route(message))
        except RequestRejected as exc:
            # The engine names the chat field; a legacy completion's prompt is `prompt`.
            param = exc.param
            if param == "messages" and message.get("messages") is None:
                param = "prompt"
            self._reject(message["id"], exc.message, param)
        except (ValueError, TypeError, KeyError) as exc:
            # A chat template that rejects the conversation (roles out of order ...).
            self._reject(message["id"], f"cannot build the prompt: {exc}", "messages")

    def _embed(self, message: dict[str, Any]) -> None:
        embedder = self.embedders.get(message["model"])
        if embedder is None:
            self._reject(message["id"], f"model {message['model']!r} is not an embedding "
                         "model here", "model")
            return
        inputs = list(message["input"])
        if inputs and not isinstance(inputs[0], str):
            vocab = vocabulary_size(embedder.model, embedder.tokenizer)
            if any(not 0 <= t < vocab for ids in inputs for t in ids):
                self._reject(message["id"], f"token ids must be in [0, {vocab})", "input")
                return
        vectors, tokens = embedder.embed(inputs)
        self.channel.send({
            "t": "emb", "id": message["id"], "dim": int(vectors.shape[1]),
            "vectors": vectors.numpy().tobytes(), "tokens": tokens,
        })

    def _reject(self, request_id: int, text: str, param: str | None) -> None:
        self.channel.send({"t": "err", "id": request_id, "message": text, "param": param})


def _route(message: dict[str, Any]) -> Any:
    """The request's routing names (`rpfx`, packed; `rlen`: its rendering's bytes), if sent."""
    from meshnode.routing.prefix import decode_names
    from meshnode.worker.prefix import Route

    blob, length = message.get("rpfx"), message.get("rlen")
    if not isinstance(blob, bytes) or not isinstance(length, int) or length <= 0:
        return None
    return Route(decode_names(blob), length)


def _event_wire(engine: Any, event: Any) -> list[Any]:
    """A TextEvent as the `step` frame carries it; logprobs (when asked) as
    [[token bytes, logprob | None, [[bytes, logprob], ...]], ...], then the stop string that
    fired, if one did (logprobs None before it when not asked)."""
    item: list[Any] = [event.request_id, event.choice, event.text, event.finish]
    if event.logprobs is not None:
        token_bytes = engine.grammars.token_bytes
        item.append([[token_bytes(e.token), e.logprob,
                      [[token_bytes(t), v] for t, v in e.top]] for e in event.logprobs])
    if event.stop_sequence is not None:
        if event.logprobs is None:
            item.append(None)
        item.append(event.stop_sequence)
    return item


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshnode-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    # No hub access, ever; and no progress bars on the node's stderr.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = WorkerConfig.from_json(args.spec)

    from meshnode.worker.protocol import BlockingChannel

    sock = socket.socket(fileno=args.fd)
    channel = BlockingChannel(sock)
    worker = Worker(config, channel)
    try:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        worker.device = _resolve_device(config.device)
        if worker.device.type == "cuda":
            # Bind before anything touches CUDA, so every allocation and stream is this card's.
            torch.cuda.set_device(worker.device)
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        channel.send({"t": "hello", "pid": os.getpid(), "device": str(worker.device),
                      "cuda_count": cuda_count})
        info = worker.load()
        worker.warm_up()
        from meshnode.worker.engine import INJECT_OOM_ENV

        for engine in worker.engines.values():  # the test hook, only ever set by tests
            engine.inject_oom = int(os.environ.get(INJECT_OOM_ENV, "0") or 0)
    except Exception as exc:  # noqa: BLE001 - anything at load time is reported, then we exit
        log.exception("worker failed to start")
        try:
            channel.send({"t": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        return 3
    # A first heartbeat before `ready`, so capacity has memory figures from the start.
    channel.send({"t": "hb", "tps": 0.0, "mem": _memory_bytes(worker.device), "active": 0,
                  "queued": 0})
    channel.send({"t": "ready", "models": info})
    log.info("worker ready on %s: %s", worker.device, ", ".join(info))
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the node went away
    return 0


if __name__ == "__main__":
    sys.exit(main())
