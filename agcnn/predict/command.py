"""``agcnn predict`` on the command line: its arguments, and the exit status of a run."""

from __future__ import annotations

import argparse
import sys

from agcnn import libmessages
from agcnn.argtypes import int_at_least
from agcnn.config import EXPLAIN_METHODS
from agcnn.errors import EXIT_FAILED, EXIT_OK
from agcnn.predict.options import PredictOptions, parse_shard
from agcnn.predict.run import predict
from agcnn.runtime import cpu_count


_positive = int_at_least(1)
_non_negative = int_at_least(0, " (0 decodes in the main process)")
_non_negative_count = int_at_least(0, " (0: the findings called positive)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Outputs: OUT/predictions.csv and .jsonl (one row per file), OUT/manifest.json, and with\n"
        "--overlays OUT/overlays/<path>.png, with --dicom-out DIR a DICOM SR and Secondary Capture per\n"
        "predicted DICOM image (these carry the patient's identifiers). Only frontal chest radiographs are\n"
        "predicted (see --any-body-part, --any-view). Exit status: 0 every usable file was predicted\n"
        "(skipped files are listed), 1 some usable files failed or some DICOM results could not be\n"
        "written (the notes column says why; --retry-failed retries both), 2 usage error (nothing done).\n"
        "Outputs hold no patient identifiers unless --include-identifiers; they do hold the\n"
        "relative paths and the DICOM Study/Series/SOP Instance UIDs (pseudonymous keys for\n"
        "joining results back to the PACS)."
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by `agcnn train`")
    parser.add_argument("--input", required=True, help="folder of DICOM / PNG / JPEG files (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the results; re-running on it resumes")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per model batch (default 32)")
    parser.add_argument(
        "--workers", type=_non_negative, default=min(4, cpu_count()),
        help="decoding processes (default min(4, CPUs); at most the CPUs this process may use); 0 decodes in the main process",
    )
    parser.add_argument("--overlays", action="store_true",
                        help="write a picture per predicted image: attention heatmap and box, and the fusion CAM of each "
                             "finding called positive at the checkpoint's operating points (or of the top findings)")
    parser.add_argument("--explain", choices=EXPLAIN_METHODS, default="cam",
                        help="overlay maps: class activation maps (default) or Grad-CAM from monai.visualize")
    parser.add_argument("--overlay-top", type=_non_negative_count, default=None, metavar="K",
                        help="overlays explain the K most probable findings instead of those called positive "
                             "(default: called positive; the top 3 when the checkpoint has no operating points)")
    parser.add_argument(
        "--include-identifiers", action="store_true",
        help="add PatientID, AccessionNumber and StudyDate columns (read from the DICOM header; off by default)",
    )
    parser.add_argument("--all-branches", action="store_true", help="also write the global and local branch probabilities")
    parser.add_argument(
        "--shard", type=parse_shard, default=None, metavar="K/N",
        help="process share K of N (0-based) into OUT/shard-K-of-N/; set from RANK/WORLD_SIZE under torchrun",
    )
    parser.add_argument(
        "--any-body-part", action="store_true",
        help="also predict DICOM images whose BodyPartExamined / Anatomic Region Sequence names another body part "
             "(default: skipped, reason out_of_scope)",
    )
    parser.add_argument(
        "--any-view", action="store_true",
        help="also predict lateral, oblique and decubitus views (default: skipped, reason not_frontal)",
    )
    parser.add_argument(
        "--retry-failed", action="store_true",
        help="on resume, process the files whose rows are 'failed' again and replace those rows "
             "(with --dicom-out also those whose DICOM results could not be written)",
    )
    parser.add_argument(
        "--dicom-out", metavar="DIR", default=None,
        help="write a DICOM SR and a Secondary Capture per predicted DICOM image into DIR; these carry the "
             "source's patient and study modules (identifiers), unlike predictions.csv",
    )



def run(args: argparse.Namespace) -> int:
    options = PredictOptions(
        checkpoint=args.checkpoint,
        input=args.input,
        output=args.output,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        overlays=args.overlays,
        explain=args.explain,
        overlay_top=args.overlay_top,
        include_identifiers=args.include_identifiers,
        all_branches=args.all_branches,
        shard=args.shard,
        any_body_part=args.any_body_part,
        any_view=args.any_view,
        retry_failed=args.retry_failed,
        dicom_out=args.dicom_out,
    )
    summary = predict(options)
    libmessages.report("agcnn predict")
    if summary.dicom_fixes:
        # By attribute and rule, never the value: the per-file detail is in predictions.jsonl.
        print(f"agcnn predict: values of the sources corrected or dropped in the DICOM results "
              f"({sum(summary.dicom_fixes.values())}):", file=sys.stderr)
        for kind, n in sorted(summary.dicom_fixes.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n} x {kind}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return EXIT_FAILED if summary.counts.get("failed", 0) or summary.dicom_not_written else EXIT_OK
