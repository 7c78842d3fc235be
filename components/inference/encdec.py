"""The encoder-decoder on onnxruntime alone (no PyTorch): `EncDecEngine`.

An exported encoder-decoder (components/export.py, graph ``encoder_decoder``) is a folder with
two graphs and config.json:

    encoder.onnx  src_ids [B,S] i64, src_mask [B,S] bool -> cross_kv [L,2,B,nh,S,hs]   once per source
    model.onnx    input_ids [B,T] i64, past_kv, cross_kv, src_mask -> logits, present_kv   one step

    engine = load_encdec_engine(Path("exports/pydoc-seq2seq"))
    engine.transduce(["posixpath.join(a, *p)"])                      # greedy (the model's default)
    engine.transduce(["posixpath.join(a, *p)"], decoding="beam", beam_width=4)

Decoding mirrors components/models/encdec.py (greedy, sampling, beam search by summed
log-probability, width 1 = greedy); tests check it writes the same targets as PyTorch.
Importing components.inference registers it in ENGINES, so load_engine reads such a folder too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from components.inference.engines import CONFIG_FILE, ENGINES, Engine, load_engine
from components.inference.sessions import InferenceError, make_session


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class EncDecEngine(Engine):
    """Encoder graph once per source, then cached decoder steps (self-attention past + cross K/V)."""

    graph = "encoder_decoder"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str, threads: Optional[int] = None):
        super().__init__(folder, config, session, provider)
        enc_file = (config.get("files") or {}).get("encoder", "encoder.onnx")
        self.encoder, _ = make_session(Path(folder) / enc_file, threads, prefer_gpu=provider != "CPUExecutionProvider")
        c = config
        self.L, self.H, self.D = int(c["n_layer"]), int(c["n_head"]), int(c["head_dim"])
        self.source_len, self.target_len = int(c["source_len"]), int(c["target_len"])
        self.bos, self.eos, self.pad = int(c["bos_id"]), int(c["eos_id"]), int(c["pad_id"])
        self.allowed = int(c["allowed_tokens"])
        self.defaults = dict(c.get("sample") or {})
        from components.tokenizer import PairTokenizer  # numpy only

        self.tokenizer = PairTokenizer(c["vocab"])
        self.prompts = None
        if "prompt_offset" in c:   # a prompt-to-pixels model (captions-encdec): prompts in, grey levels out
            from components.tokenizer import PromptTokenizer

            self.prompts = PromptTokenizer(c["vocab"], self.source_len)

    # -- requests ------------------------------------------------------------

    def source_ids(self, source: str) -> np.ndarray:
        if not source:
            raise InferenceError("--source: empty; give the text to transduce")
        try:
            ids = self.tokenizer.encode(source, strict=True)
        except ValueError as e:
            raise InferenceError(f"--source: {e}") from None
        if len(ids) > self.source_len:
            if not self.config.get("truncate_source"):
                raise InferenceError(f"--source: {len(ids)} characters, longer than the encoder's context "
                                     f"{self.source_len} (encdec.source_len); shorten it")
            ids = ids[:self.source_len]
        return ids

    def transduce(self, sources: Sequence[str], *, decoding: Optional[str] = None, beam_width: Optional[int] = None,
                  temperature: Optional[float] = None, top_k: Optional[int] = None, seed: int = 0) -> list[str]:
        """One target per source: greedy, sample or beam (the model's sample defaults when not given)."""
        if self.prompts is not None:
            raise InferenceError(f"--source: {self.name} draws images of a prompt; give --prompt TEXT")
        d = self.defaults
        decoding = decoding or d.get("decoding", "greedy")
        beam_width = int(beam_width if beam_width is not None else d.get("beam_width", 1))
        temperature = float(temperature if temperature is not None else d.get("temperature", 1.0))
        top_k = int(top_k if top_k is not None else d.get("top_k", 0))
        if decoding not in ("greedy", "sample", "beam"):
            raise InferenceError(f"--decoding: expected greedy, sample or beam, got {decoding!r}")
        if beam_width < 1:
            raise InferenceError(f"--beam-width: must be >= 1 (1 is greedy), got {beam_width}")
        if not temperature > 0:
            raise InferenceError(f"--temperature: must be > 0, got {temperature}")
        rng = np.random.default_rng(seed)
        out = []
        for source in sources:
            src = self.source_ids(source)[None]                       # (1, S)
            mask = np.ones(src.shape, dtype=bool)
            cross = self.encoder.run(["cross_kv"], {"src_ids": src, "src_mask": mask})[0]
            if decoding == "beam":
                ids = self._beam(cross, mask, beam_width)
            else:
                ids = self._sample(cross, mask, decoding == "greedy", temperature, top_k, rng)
            out.append(self.tokenizer.decode_target(ids))
        return out

    def sample_prompts(self, prompts: Sequence[str], *, temperature: Optional[float] = None,
                       top_k: Optional[int] = None, seed: int = 0) -> np.ndarray:
        """A prompt-to-pixels model's images, one per prompt: levels (N, C, H, W) int64 (C = 1 grey, 3
        colour: a pixel's channel values are consecutive tokens), the values drawn one at a time with
        both caches. Bad prompts are refused in one line first."""
        from components.tokenizer import tokens_to_nchw

        if self.prompts is None:
            raise InferenceError(f"--prompt: {self.name} transduces text; give --source TEXT")
        temperature = float(temperature if temperature is not None else self.defaults.get("temperature", 1.0))
        top_k = int(top_k if top_k is not None else self.defaults.get("top_k", 0))
        if not temperature > 0:
            raise InferenceError(f"--temperature: must be > 0, got {temperature}")
        rows = [self.prompts.encode_prompt(p, required=True) + int(self.config["prompt_offset"]) for p in prompts]
        rng, size, out = np.random.default_rng(seed), int(self.config["image_size"]), []
        for src in rows:
            mask = np.ones((1, len(src)), dtype=bool)
            cross = self.encoder.run(["cross_kv"], {"src_ids": src[None], "src_mask": mask})[0]
            out.append(self._sample(cross, mask, False, temperature, top_k, rng))
        channels = int(self.config.get("channels", 1))
        return tokens_to_nchw(np.asarray(out, dtype=np.int64).reshape(len(rows), size * size * channels), size,
                              channels)

    def sample_images(self, prompts: Sequence[str], **kw: Any) -> np.ndarray:
        """sample_prompts as images: (N, H, W) float32 in [0, 1] grey, (N, H, W, C) colour (channels last)."""
        from components.inference.engines import nchw_to_images

        return nchw_to_images(self.sample_prompts(prompts, **kw), int(self.config["levels"]))

    # -- decoding ------------------------------------------------------------

    def _step(self, tok: np.ndarray, past: np.ndarray, cross: np.ndarray, mask: np.ndarray):
        logits, present = self.session.run(["logits", "present_kv"], {
            "input_ids": tok.astype(np.int64), "past_kv": past, "cross_kv": cross, "src_mask": mask})
        return logits[:, -1, :self.allowed].astype(np.float64), present

    def _sample(self, cross, mask, greedy: bool, temperature: float, top_k: int, rng) -> list[int]:
        past = np.zeros((self.L, 2, 1, self.H, 0, self.D), np.float32)
        tok, ids = np.array([[self.bos]]), []
        for _ in range(self.target_len):
            logits, past = self._step(tok, past, cross, mask)
            if greedy:
                nxt = int(logits[0].argmax())
            else:
                z = logits[0] / temperature
                if top_k:
                    z = np.where(z < np.sort(z)[-min(top_k, z.size)], -np.inf, z)
                p = np.exp(z - z.max())
                cdf = np.cumsum(p / p.sum())
                nxt = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))
            if nxt == self.eos:
                break
            ids.append(nxt)
            tok = np.array([[nxt]])
        return ids

    def _beam(self, cross, mask, k: int) -> list[int]:
        """Beam search by summed log-probability, as EncDec.beam_search (width 1 = greedy)."""
        past = np.zeros((self.L, 2, 1, self.H, 0, self.D), np.float32)
        seqs, scores, finished = [[]], np.zeros(1), []
        tok = np.array([[self.bos]])
        for step in range(self.target_len):
            n = len(seqs)
            logits, past = self._step(tok, past, np.repeat(cross[:, :, :1], n, axis=2), np.repeat(mask, n, axis=0))
            cand = (scores[:, None] + log_softmax(logits)).reshape(-1)
            V = logits.shape[1]
            order = np.argsort(-cand, kind="stable")[:2 * k]
            rows, toks, new_scores, new_seqs = [], [], [], []
            for i in order:
                r, t = divmod(int(i), V)
                if t == self.eos or step == self.target_len - 1:
                    finished.append((float(cand[i]), seqs[r] + ([] if t == self.eos else [t])))
                    continue
                rows.append(r)
                toks.append(t)
                new_scores.append(float(cand[i]))
                new_seqs.append(seqs[r] + [t])
                if len(new_seqs) == k:
                    break
            best_done = max((f[0] for f in finished), default=-np.inf)
            if not new_seqs or best_done >= max(new_scores):
                break
            past = past[:, :, rows]
            seqs, scores, tok = new_seqs, np.array(new_scores), np.array(toks)[:, None]
        return max(finished, key=lambda f: f[0])[1] if finished else seqs[int(np.argmax(scores))]


def load_encdec_engine(folder: Path, *, threads: Optional[int] = None, prefer_gpu: bool = True) -> EncDecEngine:
    """The engine of an exported encoder-decoder folder (load_engine, refusing any other graph)."""
    engine = load_engine(Path(folder), threads=threads, prefer_gpu=prefer_gpu)
    if not isinstance(engine, EncDecEngine):
        raise InferenceError(f"{Path(folder) / CONFIG_FILE}: graph {engine.config.get('graph')!r} is not an "
                             "encoder-decoder")
    return engine


ENGINES[EncDecEngine.graph] = EncDecEngine   # load_engine reads graph "encoder_decoder" with this engine
