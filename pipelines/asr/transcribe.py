"""Loading a trained recognizer and turning audio files into text.

`transcribe_files` prints one line per file, `path<TAB>text` (or, with `json_output`, one JSON
object per line with `path`, `text`, `seconds` (audio duration), `decode_seconds` and `segments`).
A file that is missing, empty or not audio gets one `error: ...` line on stderr naming it; the
other files are still transcribed and the exit code is then 2. Recordings longer than
`max_segment_seconds` are split at pauses and decoded in batches of segments
(`pipelines.asr.segment`), so a 10-minute file needs no more memory than a 10-second one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipelines.asr.segment import DEFAULT_MAX_SECONDS
from toolkit.errors import UserError

DEFAULT_RUNS_DIR = Path("runs") / "asr"
MODEL_FILENAME = "model.keras"


def find_latest_model(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The most recently written `model.keras` under `runs_dir` (one folder per run).

    Raises:
        UserError: there is no trained model yet.
    """
    runs_dir = Path(runs_dir)
    candidates = sorted(
        runs_dir.glob(f"*/{MODEL_FILENAME}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not candidates:
        raise UserError(
            f"no trained model in {runs_dir}/: train one first with `python -m pipelines.asr "
            "train`, or pass --model PATH"
        )
    return candidates[0]


def load_recognizer(path: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR):
    """Load a recognizer saved by `train` (`safe_mode=True`, no custom objects needed).

    Args:
        path: str, Path or None. A `model.keras` file or a run folder holding one; `None` picks
            the newest model under `runs_dir`.

    Raises:
        UserError: the file is missing or is not a recognizer saved by this pipeline.
    """
    import pipelines.asr.model  # noqa: F401  (registers the model classes)
    from pipelines.common.model_files import load_model_file

    path = find_latest_model(runs_dir) if path is None else Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    # Missing, not a zip, truncated, Lambda layers, unknown classes: one line each.
    model = load_model_file(path, what="model", compile=True)
    if not hasattr(model, "decoder_step") or not hasattr(model, "get_tokenizer"):
        raise UserError(f"{path}: not a speech recognizer saved by `python -m pipelines.asr train`")
    return model


def feature_extractor_for(model, cache_dir=None):
    """A `FeatureExtractor` with the feature parameters stored in the model."""
    from pipelines.asr.features import FeatureExtractor, FeatureParams

    params = FeatureParams.from_config(model.feature_params) if model.feature_params else None
    return FeatureExtractor(params, cache_dir=cache_dir)


def alignment_figure(alignment, text, title):
    """The cross-attention alignment (output characters x encoder frames) as a Figure."""
    from toolkit.interpret.plotting import plot_attention

    labels = (list(text) + ["</s>"])[: alignment.shape[0]]
    return plot_attention(
        alignment[: len(labels)],
        x_label="encoder frame (40 ms)",
        y_label="output character",
        title=title,
        y_tick_labels=[c if c != " " else "\u2423" for c in labels],
    )


def transcribe_files(
    audio_paths,
    model_path=None,
    beam_size: int | None = None,
    ctc_weight: float | None = None,
    lm_weight: float | None = None,
    json_output: bool = False,
    alignment_dir=None,
    runs_dir=DEFAULT_RUNS_DIR,
    stdout=None,
    stderr=None,
    max_segment_seconds: float = DEFAULT_MAX_SECONDS,
) -> int:
    """Transcribe audio files, one output line each.

    A file longer than `max_segment_seconds` is transcribed in segments cut at low-energy points
    (`pipelines.asr.segment`), with bounded memory; its text is the segments' texts in order,
    and `--alignment-png` saves one plot per segment (`<stem>.seg001.png`, ...). Beam search
    adds the model's language model with `lm_weight` when it has one. `beam_size`,
    `ctc_weight` and `lm_weight` left `None` take the model's own settings (`Decoder.settings`).

    Returns:
        0 when every file was transcribed, 2 when some could not be read (each named on stderr).

    Raises:
        UserError: no usable model.
    """
    from pipelines.asr.decode import Decoder, check_decoding_options
    from pipelines.asr.segment import audio_seconds, transcribe_long

    check_decoding_options(beam_size, ctc_weight, lm_weight)
    if not max_segment_seconds > 0:
        raise UserError(
            f"--max-segment-seconds must be positive. Received: {max_segment_seconds}"
        )
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    model = load_recognizer(model_path, runs_dir)
    extractor = feature_extractor_for(model)
    decoder = Decoder(model)
    options = decoder.settings(beam_size, ctc_weight, lm_weight)
    sample_rate = extractor.params.sample_rate
    hop = extractor.params.hop_length
    status = 0
    for path in audio_paths:
        try:
            long = audio_seconds(path) > max_segment_seconds
            if long:
                result = transcribe_long(
                    path, extractor, decoder, max_seconds=max_segment_seconds,
                    return_alignment=alignment_dir is not None, **options,
                )  # fmt: skip
            else:
                features = extractor.compute(path)
        except UserError as error:
            print(f"error: {error}", file=stderr, flush=True)
            status = 2
            continue
        except Exception as error:  # anything else the audio stack raises on a bad file
            print(f"error: {path}: unreadable audio ({type(error).__name__})", file=stderr,
                  flush=True)
            status = 2
            continue
        if long:
            text, seconds, elapsed = result.text, result.seconds, result.decode_seconds
            segments = len(result.segments)
            plots = [
                (alignment, piece, f"{Path(path).stem}.seg{k + 1:03d}.png",
                 f"Alignment: {Path(path).name}, segment {k + 1} of {segments}")
                for k, (alignment, piece) in enumerate(zip(result.alignments or [], result.texts))
            ]  # fmt: skip
        else:
            start = time.perf_counter()
            hyp = decoder.decode(
                [features], return_alignment=alignment_dir is not None, **options
            )[0]
            elapsed = time.perf_counter() - start
            text = decoder.tokenizer.decode(hyp.tokens)
            seconds = len(features) * hop / sample_rate
            segments = 1
            plots = [(hyp.alignment, text, f"{Path(path).stem}.png",
                      f"Alignment: {Path(path).name}")]  # fmt: skip
        if alignment_dir is not None:
            folder = Path(alignment_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for alignment, piece, name, title in plots:
                if alignment is not None:
                    figure = alignment_figure(alignment, piece, title)
                    figure.savefig(folder / name, dpi=100, bbox_inches="tight")
        if json_output:
            line = json.dumps({"path": str(path), "text": text, "seconds": round(seconds, 3),
                               "decode_seconds": round(elapsed, 4), "segments": segments})
        else:
            line = f"{path}\t{text}"
        print(line, file=stdout, flush=True)
    return status
