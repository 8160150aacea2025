"""Decoding: cached greedy search and joint CTC/attention beam search.

`Decoder(model)` compiles the model's `encode` and one cached `decoder_step` (a `tf.function` on
TensorFlow, `jax.jit` on JAX) and drives them from a Python loop:

- `greedy`: batched; each step feeds only the previous token and reads/writes the decoder's
  key/value cache (no recomputation of the prefix); every utterance stops at its own `</s>` and
  the loop ends when all have. `use_cache=False` recomputes the whole prefix every step (the
  reference for tests and for the speed-up measurement).
- `beam_search`: one utterance at a time with the beam as the batch; hypotheses are scored by

      score(h) = (1 - ctc_weight) * log p_att(h | x) + ctc_weight * log psi_ctc(h | x)
                 + lm_weight * log p_lm(h)

  (Watanabe et al., 2017) where psi_ctc is the CTC prefix probability (`pipelines.asr.ctc`), which
  penalises the looping and skipping attention decoders are prone to, and p_lm the n-gram
  language model stored in the recognizer, if any (`pipelines.asr.lm`, shallow fusion).
  Candidates per hypothesis are the `pre_beam` best tokens by attention (plus weighted LM)
  score; finished hypotheses are ranked by their score divided by their length
  (`length_normalization`); the search stops when every hypothesis has ended,
  when ESPnet's end detection fires (no better hypothesis ended for `end_detect_window`
  lengths), or at `max_length`, which is tied to the encoder length.

Both return the last decoder layer's cross-attention (averaged over heads) per hypothesis when
asked, an (output tokens + 1, encoder frames) alignment.

A compiled step function in a Python loop (rather than a `fori_loop`) lets each batch stop as
soon as every utterance has ended, which is what dominates on CPU: sentences are much shorter
than the worst-case `max_length`.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from pipelines.asr.ctc import DEFAULT_BEAM_SIZE, DEFAULT_CTC_WEIGHT, CTCPrefixScorer
from pipelines.asr.lm import DEFAULT_LM_WEIGHT
from pipelines.asr.tokenizer import CharTokenizer
from toolkit.errors import UserError

NEG_INF = -1e30
START_ID = CharTokenizer.start_id
END_ID = CharTokenizer.end_id
FRAME_MULTIPLE = 256  # features are padded to a multiple of this: few compiled shapes
LENGTH_MULTIPLE = 32  # the self-attention cache length is a multiple of this


@dataclasses.dataclass
class Hypothesis:
    """A decoded sequence: token ids (without `<s>`/`</s>`), its score, optional alignment."""

    tokens: list[int]
    score: float = 0.0
    alignment: np.ndarray | None = None


def compile_function(model, fn, xla: bool = False):
    """Compile `fn` (which uses `model`'s weights) for the current backend.

    TensorFlow: a `tf.function` (graph mode, shapes generalised after a retrace; XLA-compiled
    with `xla=True`); JAX: `jax.jit`
    with the model's variables passed in through a `keras.StatelessScope`, so weights are inputs
    rather than constants baked into the program. Other backends run eagerly.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if xla:
            return tf.function(fn, jit_compile=True)
        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        variables = list(model.variables)

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        jitted = jax.jit(pure)

        def call(*args):
            return jitted([v.value for v in variables], *args)

        return call
    return fn


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(max(int(value), 1) / multiple) * multiple)


def pad_batch(features_list, frame_multiple: int = FRAME_MULTIPLE):
    """Stack `(frames_i, F)` arrays into `(B, T, F)` (T a multiple of `frame_multiple`) + mask."""
    lengths = np.array([len(f) for f in features_list], "int32")
    frames = _round_up(lengths.max(), frame_multiple)
    n_mels = features_list[0].shape[-1]
    batch = np.zeros((len(features_list), frames, n_mels), "float32")
    for i, f in enumerate(features_list):
        batch[i, : len(f)] = f
    return batch, lengths


def check_decoding_options(beam_size=None, ctc_weight=None, lm_weight=None) -> None:
    """Raise `UserError` for a beam width below 1, a CTC weight outside [0, 1] or a negative
    LM weight; `None` (not given) passes."""
    if beam_size is not None and beam_size < 1:
        raise UserError(f"--beam must be at least 1. Received: {beam_size}")
    if ctc_weight is not None and not 0.0 <= ctc_weight <= 1.0:
        raise UserError(f"--ctc-weight must be in [0, 1]. Received: {ctc_weight}")
    if lm_weight is not None and lm_weight < 0:
        raise UserError(f"--lm-weight must not be negative. Received: {lm_weight}")


class Decoder:
    """Compiled greedy and beam-search decoding for a recognizer from `pipelines.asr.model`.

    Args:
        model: a built `TransformerRecognizer` or `RNNRecognizer`.
        compile: bool. Whether to compile the encoder and the decoder step. Defaults to `True`.
        max_length: int or None. Upper bound on output tokens; `None` ties it to the encoder
            length (one character per encoder frame, 40 ms for the default subsampling).
        suppress_end: bool. Never emit `</s>`, so decoding always runs to the maximum length
            (for speed measurements at a fixed output length). Defaults to `False`.
        xla: bool. On TensorFlow, XLA-compile the fused greedy loop (one compilation per
            padded shape; about 5x faster per token than graph mode on CPU). Defaults to `True`.

    Example:

    ```python
    decoder = Decoder(model)
    texts = decoder.transcribe([features_a, features_b], beam_size=4)
    ```
    """

    def __init__(
        self,
        model,
        compile: bool = True,
        max_length: int | None = None,
        suppress_end: bool = False,
        xla: bool = True,
    ):
        self.model = model
        self.tokenizer = model.get_tokenizer()
        # The n-gram language model saved inside the recognizer, if any (`pipelines.asr.lm`).
        self.language_model = getattr(model, "language_model", None)
        self.max_length = max_length
        vocab = model.vocab_size
        banned = np.zeros((vocab,), "float32")
        banned[[CharTokenizer.blank_id, START_ID]] = NEG_INF  # never emitted by the decoder
        if suppress_end:
            banned[END_ID] = NEG_INF
        self._banned = banned

        def encode(features, lengths):
            encoded, mask, ctc_logits = model.encode(features, lengths, training=False)
            return encoded, mask, ops.log_softmax(ops.cast(ctc_logits, "float32"), axis=-1)

        def step(tokens, state, index):
            log_probs, state, alignment = model.decoder_step(tokens, state, index)
            return ops.cast(log_probs, "float32") + banned, state, alignment

        def reorder_step(tokens, state, index, parents):
            # Beam search: pick each slot's parent cache and advance it, in one compiled call
            # (reordering the cache eagerly, one gather per tensor, cost as much as the step).
            state = {k: ops.take(v, parents, axis=0) for k, v in state.items()}
            return step(tokens, state, index)

        def full(tokens, encoded, mask):
            logits, alignment = model.decode_full(
                tokens, encoded, mask, training=False, return_alignment=True
            )
            return ops.log_softmax(ops.cast(logits, "float32"), axis=-1) + banned, alignment

        def loop(tokens, state, limits, max_len):
            # The whole greedy search as one compiled while-loop (no per-step dispatch).
            batch = ops.shape(tokens)[0]
            outputs = ops.zeros((batch, ops.shape(state["encoder_mask"])[1] + 2), "int32")
            finished = ops.zeros((batch,), "bool")
            scores = ops.zeros((batch,), "float32")

            def cond(i, tokens, finished, outputs, scores, state):
                return ops.logical_and(i < max_len, ops.logical_not(ops.all(finished)))

            def body(i, tokens, finished, outputs, scores, state):
                log_probs, state, _ = step(tokens, state, i)
                best = ops.cast(ops.argmax(log_probs, axis=-1), "int32")
                best_score = ops.take_along_axis(log_probs, best[:, None], axis=1)[:, 0]
                scores = scores + ops.where(finished, 0.0, best_score)
                best = ops.where(finished, 0, best)
                outputs = ops.slice_update(outputs, (0, i), best[:, None])
                finished = ops.logical_or(
                    finished, ops.logical_or(best == END_ID, i + 1 >= limits)
                )
                return i + 1, best, finished, outputs, scores, state

            result = ops.while_loop(
                cond, body, (ops.convert_to_tensor(0, "int32"), tokens, finished, outputs,
                             scores, state)
            )
            return result[0], result[3], result[4]

        if compile:
            self._loop = compile_function(model, loop, xla=xla)
            self._encode = compile_function(model, encode)
            self._step = compile_function(model, step)
            self._reorder_step = compile_function(model, reorder_step, xla=xla)
            self._full = compile_function(model, full)
        else:
            self._encode, self._step, self._full = encode, step, full
            self._reorder_step = reorder_step
            self._loop = loop

    # ------------------------------------------------------------------------------------------

    def settings(self, beam_size=None, ctc_weight=None, lm_weight=None) -> dict:
        """The decoding options `beam_size`, `ctc_weight` and `lm_weight`: each one given, else
        the one the model was trained with (`decode:` in its config, stored in the model), else
        the package default (`DEFAULT_BEAM_SIZE`, `DEFAULT_CTC_WEIGHT`, `DEFAULT_LM_WEIGHT`).

        Raises:
            UserError: an option out of range (`check_decoding_options`).
        """
        saved = getattr(self.model, "decoding", None) or {}

        def pick(value, key, default):
            return value if value is not None else saved.get(key, default)

        options = {
            "beam_size": int(pick(beam_size, "beam_size", DEFAULT_BEAM_SIZE)),
            "ctc_weight": float(pick(ctc_weight, "ctc_weight", DEFAULT_CTC_WEIGHT)),
            "lm_weight": float(pick(lm_weight, "lm_weight", DEFAULT_LM_WEIGHT)),
        }
        check_decoding_options(**options)
        return options

    def encode(self, features, lengths):
        """Run the encoder: returns NumPy-convertible (encoded, mask, ctc_log_probs)."""
        return self._encode(
            ops.convert_to_tensor(features, "float32"), ops.convert_to_tensor(lengths, "int32")
        )

    def _max_lengths(self, encoder_lengths) -> np.ndarray:
        """Per-utterance output limit: encoder length + 2, capped by `max_length`."""
        limits = np.asarray(encoder_lengths, "int64") + 2
        if self.max_length is not None:
            limits = np.minimum(limits, self.max_length)
            if self._banned[END_ID] < 0:  # suppress_end: exactly max_length tokens
                limits = np.full_like(limits, self.max_length)
        return np.maximum(limits, 1)

    def _cache_length(self, encoded, max_len: int) -> int:
        # Tied to the padded encoder length (not the batch's true lengths), so each padded
        # feature shape compiles one decoder step.
        return _round_up(max(int(encoded.shape[1]) + 2, max_len), LENGTH_MULTIPLE)

    def greedy(
        self,
        features,
        lengths,
        return_alignment: bool = False,
        use_cache: bool = True,
        fused: bool | None = None,
    ):
        """Batched greedy decoding.

        Args:
            features: (B, T, F) float array of padded features.
            lengths: (B,) int array of true frame counts.
            return_alignment: bool. Whether to return the cross-attention per utterance.
            use_cache: bool. `False` recomputes the decoder over the whole prefix each step.
            fused: bool or None. Run the whole search as one compiled while-loop (cached, no
                alignment); `None` uses it whenever possible. `False` drives the compiled step
                from Python (needed for alignments and for `use_cache=False`).

        Returns:
            list of B `Hypothesis` (score = sum of token log-probabilities, `</s>` included).
        """
        encoded, mask, _ = self.encode(features, lengths)
        enc_lengths = np.asarray(ops.convert_to_numpy(ops.sum(ops.cast(mask, "int32"), axis=1)))
        batch = int(encoded.shape[0])
        limits = self._max_lengths(enc_lengths)
        max_len = int(limits.max())
        tokens = np.full((batch,), START_ID, "int32")
        finished = np.zeros((batch,), bool)
        outputs = np.zeros((batch, max_len), "int32")
        scores = np.zeros((batch,), "float64")
        alignments = []
        cache_length = self._cache_length(encoded, max_len)
        if fused is None:
            fused = use_cache and not return_alignment
        if fused:
            if return_alignment or not use_cache:
                raise ValueError("fused greedy search needs use_cache=True, no alignment")
            state = self.model.initial_decoder_state(encoded, mask, cache_length)
            steps, outputs, scores = self._loop(
                ops.convert_to_tensor(np.full((batch,), START_ID, "int32")),
                state,
                ops.convert_to_tensor(limits.astype("int32")),
                ops.convert_to_tensor(max_len, "int32"),
            )
            steps = int(ops.convert_to_numpy(steps))
            outputs = np.asarray(ops.convert_to_numpy(outputs))
            scores = np.asarray(ops.convert_to_numpy(scores), "float64")
            hyps = []
            for b in range(batch):
                row = outputs[b, : min(steps, int(limits[b]))].tolist()
                n = row.index(END_ID) if END_ID in row else len(row)
                hyps.append(Hypothesis(row[:n], float(scores[b])))
            return hyps
        if use_cache:
            state = self.model.initial_decoder_state(encoded, mask, cache_length)
        else:
            buffer = np.zeros((batch, cache_length), "int32")
        steps = 0
        for i in range(max_len):
            if use_cache:
                log_probs, state, alignment = self._step(
                    ops.convert_to_tensor(tokens), state, ops.convert_to_tensor(i, "int32")
                )
            else:
                buffer[:, i] = tokens
                width = _round_up(i + 1, 16)
                all_log_probs, all_alignment = self._full(
                    ops.convert_to_tensor(buffer[:, :width]), encoded, mask
                )
                log_probs, alignment = all_log_probs[:, i], all_alignment[:, i]
            log_probs = np.asarray(ops.convert_to_numpy(log_probs))
            best = log_probs.argmax(axis=-1).astype("int32")
            best_scores = log_probs[np.arange(batch), best]
            scores += np.where(finished, 0.0, best_scores)
            best = np.where(finished, 0, best)
            outputs[:, i] = best
            if return_alignment:
                alignments.append(np.asarray(ops.convert_to_numpy(alignment)))
            finished |= (best == END_ID) | (i + 1 >= limits)
            tokens = best
            steps = i + 1
            if finished.all():
                break
        hyps = []
        for b in range(batch):
            row = outputs[b, : min(steps, int(limits[b]))].tolist()
            n = row.index(END_ID) if END_ID in row else len(row)
            alignment = None
            if return_alignment:
                stacked = np.stack(alignments, axis=1)[b]  # (steps, S)
                alignment = stacked[: min(n + 1, steps), : int(enc_lengths[b])]
            hyps.append(Hypothesis(row[:n], float(scores[b]), alignment))
        return hyps

    def beam_search(
        self,
        features,
        length,
        beam_size: int = DEFAULT_BEAM_SIZE,
        ctc_weight: float = DEFAULT_CTC_WEIGHT,
        pre_beam: int | None = None,
        length_normalization: bool = True,
        end_detect_window: int = 3,
        end_detect_threshold: float = math.log(1e-10),
        return_alignment: bool = False,
        nbest: int = 1,
        lm_weight: float = 0.0,
    ):
        """Joint CTC/attention beam search for one utterance.

        Args:
            features: (T, F) float array of one utterance (unpadded).
            length: int. Its number of frames.
            beam_size: int. Hypotheses kept per step. Defaults to `4`.
            ctc_weight: float in [0, 1]. Weight of the CTC prefix score. Defaults to
                `DEFAULT_CTC_WEIGHT` (0.3).
            pre_beam: int or None. Candidate tokens per hypothesis (best attention scores);
                `None` is `int(1.5 * beam_size)`.
            length_normalization: bool. Rank finished hypotheses by score / length.
            end_detect_window, end_detect_threshold: ESPnet's end detection: stop once, for
                the last `end_detect_window` lengths, the best hypothesis ending at that length
                scores below the best ended hypothesis by more than the threshold.
            return_alignment: bool. Attach the cross-attention of each hypothesis.
            nbest: int. Number of hypotheses returned. Defaults to `1`.
            lm_weight: float >= 0. Weight of the log-probability of the model's language
                model (`language_model`; shallow fusion); it also joins the attention
                score in choosing the `pre_beam` candidates. Ignored when the model has no
                language model. Defaults to `0.0`.

        Returns:
            list of `nbest` `Hypothesis`, best first.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be positive. Received: beam_size={beam_size}")
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1]. Received: ctc_weight={ctc_weight}")
        if lm_weight < 0.0:
            raise ValueError(f"lm_weight must not be negative. Received: lm_weight={lm_weight}")
        lm = self.language_model
        use_lm = lm is not None and lm_weight > 0.0
        K = int(beam_size)
        pre_beam = int(pre_beam or max(int(1.5 * K), 1))
        features = np.asarray(features, "float32")
        padded, lengths = pad_batch([features[: int(length)]])
        encoded, mask, ctc_log_probs = self.encode(padded, lengths)
        enc_len = int(np.asarray(ops.convert_to_numpy(ops.sum(ops.cast(mask, "int32")))))
        max_len = int(self._max_lengths([enc_len])[0])
        scorer = None
        if ctc_weight > 0.0:
            lp = np.asarray(ops.convert_to_numpy(ctc_log_probs))[0, :enc_len]
            scorer = CTCPrefixScorer(lp, blank_id=CharTokenizer.blank_id, eos_id=END_ID)
        state = self.model.initial_decoder_state(
            encoded, mask, self._cache_length(encoded, max_len)
        )
        state = {k: ops.take(v, np.zeros((K,), "int32"), axis=0) for k, v in state.items()}
        # Slot 0 holds the empty hypothesis; the other slots are dead until the beam fills.
        hyps = [
            {"tokens": [], "att": 0.0, "lm": 0.0, "score": 0.0 if k == 0 else NEG_INF,
             "alive": k == 0, "ctc": scorer.initial_state() if scorer else None, "align": []}
            for k in range(K)
        ]
        ended: list[tuple[float, float, dict]] = []  # (ranking score, raw score, hyp)
        ended_by_length: dict[int, float] = {}
        tokens = np.full((K,), START_ID, "int32")
        parents = np.arange(K, dtype="int32")
        for i in range(max_len):
            log_probs, state, alignment = self._reorder_step(
                ops.convert_to_tensor(tokens), state, ops.convert_to_tensor(i, "int32"),
                ops.convert_to_tensor(parents),
            )
            log_probs = np.asarray(ops.convert_to_numpy(log_probs), "float64")  # (K, V)
            alignment = np.asarray(ops.convert_to_numpy(alignment)) if return_alignment else None
            alive = [k for k in range(K) if hyps[k]["alive"]]
            ranking = log_probs[alive]
            if use_lm:
                lm_step = np.stack([lm.log_probs(hyps[k]["tokens"]) for k in alive])  # (A, V)
                ranking = ranking + lm_weight * lm_step
            cands = np.argsort(-ranking, axis=-1)[:, :pre_beam]  # (A, C)
            att_total = np.array([hyps[k]["att"] for k in alive])[:, None] + np.take_along_axis(
                log_probs[alive], cands, axis=-1
            )
            if scorer is not None:
                ctc_scores, ctc_r = scorer.score([hyps[k]["ctc"] for k in alive], cands)
                total = (1.0 - ctc_weight) * att_total + ctc_weight * ctc_scores
            else:
                total = att_total
            lm_total = 0.0
            if use_lm:
                lm_total = np.array([hyps[k]["lm"] for k in alive])[:, None] + np.take_along_axis(
                    lm_step, cands, axis=-1
                )
                total = total + lm_weight * lm_total
            order = np.argsort(-total, axis=None)[:K]
            new_hyps, parents = [], []
            for flat in order:
                a, c = divmod(int(flat), cands.shape[1])
                k = alive[a]
                label = int(cands[a, c])
                parent = hyps[k]
                hyp = {
                    "tokens": parent["tokens"] + [label],
                    "att": float(att_total[a, c]),
                    "lm": float(lm_total[a, c]) if use_lm else 0.0,
                    "score": float(total[a, c]),
                    "alive": True,
                    "ctc": (CTCPrefixScorer.next_state(ctc_r, ctc_scores, a, c, label)
                            if scorer is not None else None),
                    "align": parent["align"] + ([alignment[k, :enc_len]] if return_alignment
                                                else []),
                }
                if label == END_ID or i == max_len - 1:
                    n = len(hyp["tokens"])
                    rank = hyp["score"] / n if length_normalization else hyp["score"]
                    ended.append((rank, hyp["score"], hyp))
                    ended_by_length[n] = max(ended_by_length.get(n, NEG_INF), hyp["score"])
                else:
                    new_hyps.append(hyp)
                    parents.append(k)
            if not new_hyps or self._end_detected(
                ended_by_length, i + 1, end_detect_window, end_detect_threshold
            ):
                break
            # Refill the K slots: live hypotheses first, dead copies of slot 0 after them.
            while len(new_hyps) < K:
                dead = dict(new_hyps[0], alive=False, score=NEG_INF)
                new_hyps.append(dead)
                parents.append(parents[0])
            hyps = new_hyps
            parents = np.asarray(parents, "int32")  # reordered inside the next step
            tokens = np.asarray([h["tokens"][-1] for h in hyps], "int32")
        if not ended:  # only when max_len is reached without any hypothesis: keep the live ones
            for h in hyps:
                if h["alive"]:
                    n = max(len(h["tokens"]), 1)
                    ended.append((h["score"] / n if length_normalization else h["score"],
                                  h["score"], h))
        ended.sort(key=lambda item: -item[0])
        results = []
        for rank, _, hyp in ended[:nbest]:
            toks = [t for t in hyp["tokens"] if t != END_ID]
            align = np.stack(hyp["align"]) if return_alignment and hyp["align"] else None
            results.append(Hypothesis(toks, float(rank), align))
        return results

    @staticmethod
    def _end_detected(ended_by_length, length, window, threshold) -> bool:
        if not ended_by_length or window <= 0:
            return False
        best = max(ended_by_length.values())
        count = 0
        for m in range(window):
            score = ended_by_length.get(length - m)
            if score is not None and score - best < threshold:
                count += 1
        return count == window

    # ------------------------------------------------------------------------------------------
    def decode(
        self,
        features_list,
        beam_size: int = 1,
        batch_size: int = 16,
        ctc_weight: float = DEFAULT_CTC_WEIGHT,
        return_alignment: bool = False,
        lm_weight: float = 0.0,
    ):
        """Decode a list of `(frames, F)` feature arrays: greedy when `beam_size == 1`.

        `lm_weight` (shallow fusion, see `beam_search`) applies to beam search only.

        Returns:
            list of `Hypothesis`, in input order.
        """
        results: list[Hypothesis | None] = [None] * len(features_list)
        if beam_size <= 1:
            # Sort by length so each batch pads little; restore the order afterwards.
            order = sorted(range(len(features_list)), key=lambda i: len(features_list[i]))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch, lengths = pad_batch([features_list[i] for i in chunk])
                hyps = self.greedy(batch, lengths, return_alignment=return_alignment)
                for i, hyp in zip(chunk, hyps):
                    results[i] = hyp
        else:
            for i, features in enumerate(features_list):
                results[i] = self.beam_search(
                    features,
                    len(features),
                    beam_size=beam_size,
                    ctc_weight=ctc_weight,
                    return_alignment=return_alignment,
                    lm_weight=lm_weight,
                )[0]
        return results

    def transcribe(self, features_list, **kwargs) -> list[str]:
        """Texts of a list of `(frames, F)` feature arrays (see `decode` for the arguments)."""
        return [self.tokenizer.decode(h.tokens) for h in self.decode(features_list, **kwargs)]
