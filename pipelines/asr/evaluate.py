"""Scoring a trained recognizer on a corpus: WER, CER, S/D/I counts and decoding speed.

`evaluate(model_path, data)` decodes every utterance of a manifest (or any corpus
`pipelines.asr.data.load_corpus` reads) and returns one dict with `wer`, `cer`,
`utterances`, `rtf` (decoding time over audio time; the features are computed first and not
counted, and one utterance is decoded before timing so compilation is not counted either),
`rtf_with_features`, the word-level `substitutions`/`deletions`/`insertions` (and the same
`char_*` counts), `beam_size` and `skipped`. Utterances longer than `max_segment_seconds` are
decoded in segments cut at pauses and their texts joined (`pipelines.asr.segment`).
"""

from __future__ import annotations

import sys
import time

from pipelines.asr.segment import DEFAULT_MAX_SECONDS
from toolkit.errors import UserError


def evaluate(
    model_path=None,
    data=None,
    beam_size: int | None = None,
    ctc_weight: float | None = None,
    lm_weight: float | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
    max_segment_seconds: float = DEFAULT_MAX_SECONDS,
) -> dict:
    """Decode a corpus and score it.

    Args:
        model_path: str, Path or None. The model (`None`: the newest under `runs/asr/`).
        data: str or Path. A manifest (`.jsonl`), an LJSpeech folder or a wav+txt folder.
        beam_size: int or None. `1` is batched greedy decoding.
        ctc_weight: float or None. Weight of the CTC prefix score in beam search.
        lm_weight: float or None. Weight of the model's language model in beam search (none:
            ignored). For these three, `None` is the setting the model was trained with, else
            the package default (beam 4, CTC 0.5, LM 0.5; `Decoder.settings`).
        batch_size: int. Utterances per greedy batch. Defaults to `16`.
        limit: int or None. Only the first `limit` utterances.
        max_segment_seconds: float. Utterances longer than this are decoded in segments cut at
            pauses (`pipelines.asr.segment`), their texts joined in order. Defaults to `10.0`.

    Returns:
        dict (see the module docstring).
    """
    from pipelines.asr.data import load_corpus
    from pipelines.asr.decode import Decoder, check_decoding_options
    from pipelines.asr.metrics import error_rates
    from pipelines.asr.segment import join_texts, segment_features
    from pipelines.asr.transcribe import feature_extractor_for, load_recognizer

    if data is None:
        raise UserError("evaluate needs --data MANIFEST")
    check_decoding_options(beam_size, ctc_weight, lm_weight)
    if not max_segment_seconds > 0:
        raise UserError(
            f"--max-segment-seconds must be positive. Received: {max_segment_seconds}"
        )
    model = load_recognizer(model_path)
    decoder = Decoder(model)
    options = decoder.settings(beam_size, ctc_weight, lm_weight)
    beam_size = options["beam_size"]
    corpus = load_corpus(data)
    utterances = corpus.utterances[:limit] if limit else corpus.utterances
    if not utterances:
        raise UserError(f"{data}: no usable utterances to evaluate")
    extractor = feature_extractor_for(model)
    start = time.perf_counter()
    features = []
    owners = []  # owners[j]: index in `kept` of the utterance features[j] is (a segment of)
    kept = []
    skipped = dict(corpus.skipped)
    for utt in utterances:
        try:
            if utt.duration > max_segment_seconds:
                pieces = segment_features(utt.audio_filepath, extractor.params,
                                          max_segment_seconds)  # fmt: skip
            else:
                pieces = [extractor.compute(utt.audio_filepath)]
            owners.extend([len(kept)] * len(pieces))
            features.extend(pieces)
            kept.append(utt)
        except UserError as error:
            print(f"warning: {error}", file=sys.stderr, flush=True)
            skipped["unreadable_audio"] = skipped.get("unreadable_audio", 0) + 1
    feature_seconds = time.perf_counter() - start
    if not kept:
        raise UserError(f"{data}: none of the audio files could be read")
    decoder.decode(features[:1], **options)  # compile
    if beam_size == 1 and len(features) > 1:
        decoder.decode(features[:batch_size], beam_size=1, batch_size=batch_size)
    start = time.perf_counter()
    hyps = decoder.decode(features, batch_size=batch_size, **options)
    decode_seconds = time.perf_counter() - start
    pieces = [[] for _ in kept]
    for owner, hyp in zip(owners, hyps):
        pieces[owner].append(decoder.tokenizer.decode(hyp.tokens))
    texts = [join_texts(p) for p in pieces]
    rates = error_rates([u.text for u in kept], texts)
    params = extractor.params
    audio_seconds = sum(len(f) for f in features) * params.hop_length / params.sample_rate
    result = {
        **rates.as_dict(),
        "utterances": len(kept),
        "audio_seconds": audio_seconds,
        "decode_seconds": decode_seconds,
        "rtf": decode_seconds / audio_seconds,
        "rtf_with_features": (decode_seconds + feature_seconds) / audio_seconds,
        "beam_size": beam_size,
        "ctc_weight": options["ctc_weight"] if beam_size > 1 else 0.0,
        "lm_weight": options["lm_weight"] if beam_size > 1 and decoder.language_model else 0.0,
        "skipped": skipped,
        "examples": [
            {"reference": u.text, "hypothesis": t} for u, t in list(zip(kept, texts))[:5]
        ],
    }
    return result


def format_report(result: dict) -> str:
    """A short human-readable report of `evaluate`'s result."""
    lines = [
        f"utterances: {result['utterances']} ({result['audio_seconds']:.1f} s of audio)",
        f"WER: {result['wer']:.2%}  (S={result['substitutions']} D={result['deletions']} "
        f"I={result['insertions']} of {result['reference_words']} words)",
        f"CER: {result['cer']:.2%}  (S={result['char_substitutions']} "
        f"D={result['char_deletions']} I={result['char_insertions']} of "
        f"{result['reference_chars']} characters)",
        f"decoding: beam {result['beam_size']}, LM weight {result['lm_weight']:g}, "
        f"real-time factor {result['rtf']:.4f} "
        f"({result['rtf_with_features']:.4f} with feature extraction)",
    ]
    for example in result["examples"][:3]:
        lines.append(f"  ref: {example['reference']}")
        lines.append(f"  hyp: {example['hypothesis']}")
    return "\n".join(lines)
