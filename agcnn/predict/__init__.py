"""``agcnn predict``: batch inference over a folder of DICOM / PNG / JPEG files.

    agcnn predict --checkpoint model.pt --input /data/export --output /data/out

Every file under ``--input`` (recursively, symbolic links followed, loops and duplicates
detected) gets exactly one row in ``OUT/predictions.csv`` and its JSON Lines twin
``OUT/predictions.jsonl``: ``ok`` with the probabilities, ``skipped`` when the file is not a
usable radiograph by its nature (not an image, no pixel data, CT / MR / ..., another body
part or a lateral view: see Scope), ``failed`` when
it looks like one but could not be processed (truncated, corrupt, unreadable, implausible size,
empty). The ``reason`` column holds a stable code (see :data:`agcnn.data.readers.REASONS`)
followed by a short message.

Columns, in order:

* ``path`` (relative to ``--input``, ``/``-separated), ``status``, ``reason``, ``format``,
  ``height``, ``width`` (the original image's pixel size);
* ``sop_instance_uid``, ``series_instance_uid``, ``study_instance_uid`` for DICOM files;
* with ``--include-identifiers``: ``PatientID``, ``AccessionNumber``, ``StudyDate``;
* one fusion probability per label, named by the label, in the checkpoint's label order;
* with ``--all-branches``: ``global_<label>`` and ``local_<label>``;
* ``box_x0, box_y0, box_x1, box_y1``: the attended region (paper Sec. 3.2) in the ORIGINAL
  image's pixels, x1 / y1 exclusive;
* ``call_<label>`` (0 / 1) when the checkpoint carries fusion operating points;
* ``notes``: what the reader did (``MONOCHROME1 inverted``, window applied, ...).

Privacy. No patient name, ID, birth date, accession number or other attribute of the DICOM
PS3.15 Annex E basic profile is written, neither to the outputs nor to the log, unless
``--include-identifiers`` is given. Two things are kept because results must be joined back to
the PACS: the Study / Series / SOP Instance UIDs (pseudonymous keys, but keys: whoever has the
PACS can resolve them) and the relative paths (folder names in an export can themselves be
patient names or IDs; ``manifest.json`` also records ``--input`` and ``--output`` as given).
Treat the output folder with the same care as the input when either applies.

Scope. Only frontal chest radiographs are predicted (:mod:`agcnn.data.scope`): a DICOM file
whose Body Part Examined (or Anatomic Region Sequence) names another body part is ``skipped``
with reason ``out_of_scope``, one whose View Position (or View Code Sequence) is lateral,
oblique or decubitus with ``not_frontal``; the reason names the attribute and its value. AP
supine films are predicted with a note; files without these attributes (PNG, many secondary
captures) are predicted with a note that scope was not checked. ``--any-body-part`` /
``--any-view`` switch a check off; the manifest records both.

DICOM results. ``--dicom-out DIR`` writes, per predicted DICOM instance, a Comprehensive SR and
a Secondary Capture (:mod:`agcnn.dicom_out`) under ``DIR/<relative path>.sr.dcm`` / ``.sc.dcm``.
They carry the source's patient and study modules -- that is how an archive files them with the
study -- so they hold identifiers, unlike everything in ``OUT``.

Resuming. Each finished batch is appended to ``predictions.jsonl`` with one write and an
fsync, one complete JSON object per line. A re-run on the same output folder reads it back,
drops a trailing partial line left by a kill, and processes only the files without a row; so
after any interruption (even ``kill -9``) a re-run ends with exactly one row per file.
``predictions.csv`` and the sorted ``predictions.jsonl`` are rewritten atomically at the end.
A re-run with another checkpoint, or other column or scope options, on the same folder is
refused. ``--retry-failed`` makes a resumed run process the files whose rows are ``failed``
again (a decoder installed, a file re-exported) and replace those rows; ``ok`` and ``skipped``
rows stay. A file's DICOM results are written before its row, so a kill in between only means
they are written again (same file names, new UIDs): one set per instance. The output folder's
lock belongs to the main process alone, and the loader's workers die with it, so a restart right
after a ``kill -9`` (a preempted or OOM-killed job) is not refused.

Scale-out. ``--shard K/N`` (or ``RANK`` / ``WORLD_SIZE`` under ``torchrun``) takes the files
whose relative path hashes to K modulo N -- a choice that depends on the path alone, so each
share is the same whatever the others see -- and writes ``OUT/shard-K-of-N/``;
``agcnn merge OUT`` joins the shares.

The package, one module per part (each imports only the ones listed before it):

* :mod:`~agcnn.predict.options` -- :class:`PredictOptions` (one run's options, checked before
  any work; its errors are :class:`agcnn.errors.UsageError`);
* :mod:`~agcnn.predict.listing` -- the input folder as sorted relative paths; shares;
* :mod:`~agcnn.predict.records` -- decoding a file into a record (in the loader's workers);
* :mod:`~agcnn.predict.rows` -- the columns, and :func:`build_rows` (records + probabilities ->
  rows, a pure function);
* :mod:`~agcnn.predict.journal` -- the output folder: journal, final tables, state, lock;
* :mod:`~agcnn.predict.run` -- :func:`predict`: the model (:mod:`agcnn.inference`), loader, the batch loop;
* :mod:`~agcnn.predict.command` -- ``agcnn predict`` arguments and exit status;
* :mod:`~agcnn.predict.merge` -- ``agcnn merge``.
"""

from agcnn.predict.journal import Journal, iter_rows, write_tables
from agcnn.predict.listing import Listing, list_files, shard_of
from agcnn.predict.options import PredictOptions, parse_shard
from agcnn.predict.rows import build_rows, columns_for
from agcnn.predict.run import Summary, predict, predict_folder

__all__ = [
    "Journal",
    "Listing",
    "PredictOptions",
    "Summary",
    "build_rows",
    "columns_for",
    "iter_rows",
    "list_files",
    "parse_shard",
    "predict",
    "predict_folder",
    "shard_of",
    "write_tables",
]
