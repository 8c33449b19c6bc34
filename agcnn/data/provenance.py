"""Which patients a checkpoint's weights have seen, recorded so that evaluation cannot leak.

**The split record.** Every checkpoint carries ``split``: one *run record* per training run whose
data went into any of its weights, and for each branch (``global``, ``local``, ``fusion``) the
runs that trained it. A stage trained from scratch has one run; a stage seeded (``--seed-from``,
or the stage before in the same run folder) or resumed carries the earlier checkpoint's runs
forward, so a local stage seeded from a global checkpoint trained on another table still says
which patients its global branch was trained on. A run record holds the data settings that
decide the split, and for the training and validation splits (validation patients chose the
checkpoint and the operating points) the number of images and patients and a digest of each set.

**What it reveals.** Patient IDs are compared only after :func:`normalise_patient_id`. Without a
site key the record holds counts and *set digests* only: a sha256 of the run's random nonce and
the sorted set. A digest confirms a whole set one already holds (the split rebuilt from the same
table) and says nothing about one ID, so membership cannot be tested. With a site key
(``AGCNN_SITE_KEY_FILE``, a file holding the secret, or ``AGCNN_SITE_KEY``, the secret itself)
the record also holds, per training and validation patient, the first 16 hex digits of
HMAC-SHA256(key, ID). The key never enters the checkpoint (only a key id, an HMAC of a fixed
text, to tell which key was used); without it the hashes cannot be tested for an ID, however
small the ID space. File paths are never stored: image names only inside digests, and the files
the pre-check left out as counts per split and reason.

**The checks.** :func:`check_seed` refuses (exit 2) to start a stage from a checkpoint whose
training patients sit in this run's validation or test split, or whose record cannot show that
they do not, unless the caller allows it, in which case the record keeps the statement and every
report repeats it. :func:`check_evaluated_set` (``evaluate``, ``localize``, calibration) refuses an
evaluated set holding any branch's training patients. A run's training patients are shown to be
absent in one of two ways: the evaluated patients all lie outside the training split of a table
rebuilt here whose training set has the run's digest, or (with the run's site key) by their
keyed hashes. Otherwise the check cannot be made, and that is refused as well.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from agcnn.data.tables import SPLITS, normalise_patient_id
from agcnn.errors import ConfigError, MissingFileError, UsageError

# The data settings that decide which image falls into which split (data.root is left out: the
# same files moved to another folder make the same split, which the digests confirm).
SPLIT_KEYS = ("dataset", "metadata", "train_list", "val_list", "test_list", "path_column", "patient_column",
              "label_map", "views", "val_fraction", "test_fraction", "split_seed", "image_wise_split",
              "synthetic_count", "synthetic_size", "synthetic_seed")
RECORD_VERSION = 2
KEY_ENV = "AGCNN_SITE_KEY"
KEY_FILE_ENV = "AGCNN_SITE_KEY_FILE"
MIN_KEY_BYTES = 16
IMAGE_WISE = "image-wise split: patients may be on both sides"
# How every report states a set declared another site's (``--external-site``); "; " and how far
# it was checked follow.
EXTERNAL_SITE = "external site: declared (--external-site) to hold no patient of the training data"
# What normalise_table names the images of a table without patient IDs.
_MADE_UP = re.compile(r"image-\d+")
_BRANCH_OF = {"global_branch": "global", "local_branch": "local", "fusion": "fusion"}


class ProvenanceError(UsageError, ValueError):
    """The data would evaluate or train on patients the weights have seen; found before anything is written."""


# ---------------------------------------------------------------------- the site key

def site_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The site secret from ``AGCNN_SITE_KEY_FILE`` (a file) or ``AGCNN_SITE_KEY`` (the text); None without one."""
    env = os.environ if environ is None else environ
    path, text = env.get(KEY_FILE_ENV), env.get(KEY_ENV)
    if path and text:
        raise ConfigError(f"both {KEY_FILE_ENV} and {KEY_ENV} are set; set one of them (the file is the safer)")
    if path:
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"{KEY_FILE_ENV}={path!r} is not a file; point it at the site key file "
                                   f"(made once with: python -c 'import secrets; print(secrets.token_hex(32))' > FILE)")
        key = p.read_bytes().strip()
        where = KEY_FILE_ENV
    elif text:
        key, where = text.strip().encode("utf-8"), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the site key in {where} has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes, "
                          f"e.g. python -c 'import secrets; print(secrets.token_hex(32))'")
    return key


def key_id(key: bytes) -> str:
    """Which key made a record's hashes; an HMAC of a fixed text, so it tells nothing about the key."""
    return hmac.new(key, b"agcnn site key id", hashlib.sha256).hexdigest()[:16]


def keyed_hashes(ids: Iterable[str], key: bytes) -> set[str]:
    """HMAC-SHA256 of each normalised patient ID under the site key, first 16 hex digits (64 bits)."""
    return {hmac.new(key, normalise_patient_id(p).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]
            for p in ids}


# ---------------------------------------------------------------------- tables

def has_patient_ids(table: pd.DataFrame) -> bool:
    """False when the table had no patient column: :func:`agcnn.data.tables.normalise_table` then
    names every image ``image-0, image-1, ...`` as its own patient."""
    ids = table["patient"].astype(str)
    return not (bool(len(ids)) and bool(ids.str.fullmatch(_MADE_UP).all()) and ids.is_unique)


def image_names(paths: Iterable[str]) -> list[str]:
    """File names without their folders: the same images under another data.root are the same images."""
    return [str(p).replace("\\", "/").rsplit("/", 1)[-1] for p in paths]


def _units(table: pd.DataFrame, image_wise: bool) -> set[str]:
    """What a split keeps apart: patients, or image names for an image-wise split."""
    if image_wise:
        return set(image_names(table["path"]))
    return {normalise_patient_id(p) for p in table["patient"].astype(str)}


def _digest(values: Iterable[str], nonce: str) -> str:
    h = hashlib.sha256(nonce.encode() + b"\n")
    for v in sorted(set(values)):
        h.update(v.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def split_summary(table: pd.DataFrame, nonce: str, key: bytes | None = None) -> dict[str, Any]:
    """Images, patients and the set digests of one split's table (``path`` and ``patient`` columns)."""
    ids = has_patient_ids(table)
    out: dict[str, Any] = {
        "images": int(len(table)),
        "patients": int(len(_units(table, False))) if ids else None,
        "patients_digest": _digest(_units(table, False), nonce) if ids else None,
        "images_digest": _digest(image_names(table["path"]), nonce),
    }
    if key is not None and ids:
        out["hashes"] = sorted(keyed_hashes(table["patient"].astype(str), key))
    return out


def set_record(table: pd.DataFrame, key: bytes | None = None) -> dict[str, Any]:
    """What to store about any other set of images a checkpoint was fitted on (a calibration set,
    say), as a training run stores its splits: counts, set digests under a fresh nonce, and with
    the site key (default: from the environment) keyed hashes of its patients and image names."""
    key = site_key() if key is None else key
    nonce = secrets.token_hex(8)
    out = {"id": nonce, "key_id": key_id(key) if key is not None else None, **split_summary(table, nonce, key)}
    if key is not None:
        out["image_hashes"] = sorted(_keyed_names(image_names(table["path"]), key))
    return out


def set_overlap(record: dict[str, Any], table: pd.DataFrame, key: bytes | None = None,
                whole: pd.DataFrame | None = None) -> tuple[int | None, str]:
    """(how many of ``table``'s patients -- image names without patient IDs -- are in the set of
    :func:`set_record`, or None when that cannot be told; the unit counted). Without the site key
    it can be told when ``whole`` (the table rebuilt from the checkpoint's data settings) has a
    split with the set's digest: the set is that split."""
    key = site_key() if key is None else key
    ids = has_patient_ids(table)
    unit = "patients" if ids and (record.get("hashes") is not None or record.get("patients_digest")) else "image files"
    if whole is not None:
        wise = unit != "patients"
        digest = record.get("images_digest" if wise else "patients_digest")
        mine = _units(table, wise)
        for s in SPLITS:
            part = whole[whole["split"] == s]
            if len(part) and _digest(_units(part, wise), record["id"]) == digest:
                # The fitting set is that split, whose members are known here.
                return len(mine & _units(part, wise)), unit
    if key is None or record.get("key_id") != key_id(key):
        return None, unit
    if unit == "patients":
        return len(keyed_hashes(table["patient"].astype(str), key) & set(record["hashes"])), unit
    return len(_keyed_names(image_names(table["path"]), key) & set(record.get("image_hashes") or [])), unit


def _keyed_names(names: Iterable[str], key: bytes) -> set[str]:
    return {hmac.new(key, b"image\0" + n.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16] for n in names}


# ---------------------------------------------------------------------- records

def run_record(data_cfg, tables: dict[str, pd.DataFrame], key: bytes | None = None) -> dict[str, Any]:
    """One training run: its split settings and the summaries of its ``train`` and ``val`` tables."""
    data = dataclasses.asdict(data_cfg)
    nonce = secrets.token_hex(8)
    image_wise = not all(has_patient_ids(tables[s]) for s in ("train", "val") if len(tables[s]))
    return {
        "id": nonce,
        "settings": {k: data.get(k) for k in SPLIT_KEYS},
        "image_wise": image_wise,
        "key_id": key_id(key) if key is not None else None,
        "train": split_summary(tables["train"], nonce, key),
        "val": split_summary(tables["val"], nonce, key),
    }


def split_record(data_cfg, tables: dict[str, pd.DataFrame], key: bytes | None = None) -> dict[str, Any]:
    """The record of a run that has trained no branch yet (see :func:`carry_forward`)."""
    run = run_record(data_cfg, tables, key)
    return {"version": RECORD_VERSION, "current": run["id"], "runs": {run["id"]: run}, "branches": {}, "allowed": []}


def upgrade(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record of any version in the current form (version 1: one run, salted unkeyed hashes)."""
    if not record:
        return None
    if record.get("version", 1) >= 2:
        return record
    run = {"id": record.get("salt", "v1"), "settings": record.get("settings", {}), "image_wise": False,
           "key_id": None, "legacy_salt": record.get("salt"), "legacy_train_hashes": record.get("train_patients", []),
           "train": {"images": record["train"]["images"], "patients": record["train"]["patients"]},
           "val": {"images": record["val"]["images"], "patients": record["val"]["patients"]}}
    return {"version": RECORD_VERSION, "current": run["id"], "runs": {run["id"]: run}, "branches": {}, "allowed": []}


def carry_forward(record: dict[str, Any] | None, previous: dict[str, Any] | None, trains: Sequence[str],
                  copies: dict[str, str] | None = None) -> dict[str, Any] | None:
    """This run's record with the runs of ``previous`` (the seed or resumed checkpoint) carried forward.

    ``trains``: the model modules this stage trains (``global_branch``, ``local_branch``,
    ``fusion``); each gets this run on top of the runs its starting weights came from: its own
    in ``previous``, and those of the module ``copies`` says it started as (the local branch as
    the global one, the fusion head from the global classifier). The frozen branches keep the
    runs ``previous`` records for them.
    """
    prev = upgrade((previous or {}).get("split"))
    if record is None:
        if prev is None:
            return None
        # Data passed in without a table of patients, on top of recorded weights: the record
        # goes on, and the patients this run added are unknown.
        record = {"version": RECORD_VERSION, "current": "unrecorded", "allowed": [], "branches": {},
                  "runs": {"unrecorded": {"id": "unrecorded", "unrecorded": True}}}
    out = copy.deepcopy(record)
    if previous is not None and prev is None:
        # A seed without a record (written before records, or from data passed in directly).
        out["runs"]["unrecorded"] = {"id": "unrecorded", "unrecorded": True}
        out["branches"] = {b: ["unrecorded"] for b in ("global", "local", "fusion")}
    elif prev is not None:
        for rid, run in prev["runs"].items():
            out["runs"].setdefault(rid, run)
        out["branches"] = copy.deepcopy(prev.get("branches", {}))
        for field in ("allowed", "allowed_details"):
            for s in prev.get(field, []):
                if s not in out.setdefault(field, []):
                    out[field].append(s)
    before = copy.deepcopy(out["branches"])
    for module in trains:
        b = _BRANCH_OF.get(module, module)
        source = (copies or {}).get(module)
        inherited = set(before.get(_BRANCH_OF.get(source, source), [])) if source else set()
        out["branches"][b] = sorted(set(before.get(b, [])) | inherited | {out["current"]})
    return out


def left_out_summary(problems: Iterable[Any]) -> list[dict[str, Any]]:
    """The files the pre-check left out as counts per split and reason: their paths may hold names."""
    counts: dict[tuple[str, str], int] = {}
    for p in problems:
        counts[(p.split, p.reason)] = counts.get((p.split, p.reason), 0) + 1
    return [{"split": s, "reason": r, "files": n} for (s, r), n in sorted(counts.items())]


def changed_settings(run: dict[str, Any], data_cfg) -> list[str]:
    """``data.key: <training value> in training, <value> here`` for every split setting that differs."""
    now = dataclasses.asdict(data_cfg)
    was = run.get("settings", {})
    return [f"data.{k}: {was.get(k)!r} in training, {now.get(k)!r} here" for k in SPLIT_KEYS
            if k in was and was.get(k) != now.get(k)]


def _branches_of(record: dict[str, Any], rid: str) -> list[str]:
    names = [b for b in ("global", "local", "fusion") if rid in record.get("branches", {}).get(b, [])]
    return names or ["checkpoint"]


def _who(record: dict[str, Any], rid: str, whose: str = "the checkpoint") -> str:
    """``the global branch of the checkpoint`` (the branches the run trained), or ``the checkpoint``."""
    names = _branches_of(record, rid)
    if names == ["checkpoint"]:
        return whose
    return "the " + " and ".join(names) + " branch" + ("es" if len(names) > 1 else "") + f" of {whose}"


# ---------------------------------------------------------------------- checks

def _run_overlap(run: dict[str, Any], units: set[str] | None, image_wise: bool, key: bytes | None,
                 whole: pd.DataFrame | None, outside_train: bool) -> tuple[int | None, str | None]:
    """(patients of ``units`` that ``run`` trained on, or None; why it could not be told)."""
    if run.get("unrecorded"):
        return None, "a checkpoint it was seeded from records no training split"
    unit = "images" if run.get("image_wise") or image_wise else "patients"
    if whole is not None and outside_train:
        # The rebuilt table's training split is the run's one: the evaluated units, all outside
        # it, cannot be training units of the run.
        train = whole[whole["split"] == "train"]
        digest = run["train"].get(f"{unit}_digest")
        if digest is not None and _digest(_units(train, unit == "images"), run["id"]) == digest:
            return 0, None
    if units is None:
        return None, "the evaluated images carry no patient IDs"
    if unit == "images":
        return None, ("the run was split image by image (no patient IDs), so its training images can only be "
                      "recognised in the table it was trained on")
    if run.get("legacy_train_hashes") is not None:
        salt = run["legacy_salt"]
        mine = {hashlib.sha256(f"{salt}\0{p}".encode("utf-8", "surrogatepass")).hexdigest()[:16] for p in units}
        return len(mine & set(run["legacy_train_hashes"])), None
    if run["train"].get("hashes") is None:
        return None, ("it was recorded without a site key (counts and digests only), and the table it was trained "
                      "on was not rebuilt here")
    if key is None:
        return None, f"its patient hashes need the site key it was trained with; set {KEY_FILE_ENV}"
    if key_id(key) != run["key_id"]:
        return None, f"its patient hashes were made with another site key than the one in {KEY_FILE_ENV} / {KEY_ENV}"
    return len(keyed_hashes(units, key) & set(run["train"]["hashes"])), None


def _overlaps(record: dict[str, Any], units: set[str] | None, image_wise: bool, key: bytes | None,
              whole: pd.DataFrame | None, outside_train: bool, skip: str | None = None) -> list[tuple[str, int | None, str | None]]:
    return [(rid, *_run_overlap(run, units, image_wise, key, whole, outside_train))
            for rid, run in record["runs"].items() if rid != skip]


def check_seed(previous: dict[str, Any] | None, record: dict[str, Any] | None, table: pd.DataFrame, data_cfg, *,
               stage: str, allow: bool = False, key: bytes | None = None, how: str = "seed") -> list[str]:
    """Refuse to start ``stage`` from ``previous`` (a loaded checkpoint) when its weights were trained
    on patients of this run's validation or test split (``table``: this run's whole table, or its
    train and val rows), or when its record cannot show that they were not.

    Returns ``[statement, details]`` to record when ``allow`` (``--allow-seed-overlap``) lets it
    go on (see :func:`allow_start`); raises :class:`ProvenanceError` otherwise. ``how``: ``seed``
    or ``resume``, for the message.
    """
    if record is None:
        return []
    prev = upgrade((previous or {}).get("split"))
    held = table[table["split"] != "train"]
    image_wise = bool(len(held)) and not has_patient_ids(held)
    units = _units(held, False) if not image_wise else None
    problems = []
    if prev is None:
        problems.append("it records no training split, so the patients its weights were trained on are unknown")
    else:
        for rid, n, why in _overlaps(prev, units, image_wise, key, table, True, skip=record["current"]):
            run = prev["runs"][rid]
            changed = "; ".join(changed_settings(run, data_cfg)) or "no split setting differs"
            if n:
                parts = []
                for s in ("val", "test"):
                    part = held[held["split"] == s]
                    k = len(keyed_hashes(_units(part, False), key) & set(run["train"].get("hashes") or [])) if key else 0
                    if k:
                        parts.append(f"{k} in its {'validation' if s == 'val' else 'test'} split")
                where = ", ".join(parts) or f"{n} in its validation and test splits"
                problems.append(f"{_who(prev, rid, 'that checkpoint')} was trained on {n} patients that this run "
                                f"holds out ({where}; split settings: {changed})")
            elif n is None:
                problems.append(f"whether {_who(prev, rid, 'that checkpoint')} was trained on patients this run holds "
                                f"out cannot be checked: {why} (split settings: {changed})")
    if not problems:
        return []
    text = (f"the {stage} stage would {how} from a checkpoint whose training patients may sit in this run's validation "
            f"or test split: {'; and '.join(problems)}")
    if not allow:
        raise ProvenanceError(
            f"refusing to {how} the {stage} stage: {text.split(': ', 1)[1]}. Train on a table whose held-out patients "
            f"the earlier run never trained on (data.metadata, data.split_seed, the split lists), set the site key "
            f"both runs used, or pass --allow-seed-overlap to train anyway (every report then says so)")
    return [f"--allow-seed-overlap: the {stage} stage was {'resumed' if how == 'resume' else 'seeded'} from weights that "
            f"may have been trained on patients this run holds out", text]


def allow_start(record: dict[str, Any], lines: Sequence[str]) -> None:
    """Record what :func:`check_seed` let through: the statement every report repeats, and its details."""
    if not lines:
        return
    statement, details = lines
    if statement not in record["allowed"]:
        record["allowed"].append(statement)
    record.setdefault("allowed_details", [])
    if details not in record["allowed_details"]:
        record["allowed_details"].append(details)


def check_evaluated_set(ckpt: dict[str, Any], table: pd.DataFrame, *, name: str = "evaluated",
                        whole: pd.DataFrame | None = None, data_cfg=None, allow: bool = False,
                        key: bytes | None = None, external: bool = False) -> dict[str, Any]:
    """Refuse to evaluate ``table`` (columns ``path``, ``patient``) with ``ckpt`` when it holds
    training patients of any branch, or when that cannot be ruled out; the function ``evaluate``,
    ``localize`` and calibration share.

    ``whole``: the table rebuilt from the checkpoint's data settings (every split), when the
    evaluated rows are one of its splits (``name``); with ``data_cfg`` a training or validation
    split that differs from the one the checkpoint records is a problem too. ``key``: the site key
    (default: from the environment). ``allow``: return the problems instead of raising (the
    caller's ``--allow-other-split``; every report must then state them). ``external``: the caller
    declares (``--external-site``) that the table comes from another site than every training run
    behind the checkpoint, so no patient can be in both: an overlap that cannot be checked here is
    then a statement, not a problem; one that can be counted is still checked, and refused.

    Returns ``recorded``, ``problems``, ``allowed_other_split``, ``patients_also_in_train`` (None
    when it could not be counted), ``image_wise``, ``statements`` (what every report must say)
    and the recorded ``train`` / ``val`` counts of the run that trained the checkpoint's stage.
    """
    if key is None:
        key = site_key()
    record = upgrade(ckpt.get("split"))
    ids = has_patient_ids(table) if len(table) else True
    info: dict[str, Any] = {"recorded": record is not None, "problems": [], "allowed_other_split": allow,
                            "patients_also_in_train": None, "image_wise": not ids, "rebuilt": whole is not None,
                            "external_site": external}
    if record is None:
        info["statements"] = ([IMAGE_WISE] if not ids else []) + ([EXTERNAL_SITE + "; not checked"] if external else [])
        return info
    current = record["runs"].get(record["current"], {})
    if current.get("image_wise"):
        info["image_wise"] = True
    if whole is not None and data_cfg is not None and "images_digest" in current.get("train", {}):
        moved = [s for s in ("train", "val") if _moved(current, whole[whole["split"] == s], s)]
        if moved:
            changed = changed_settings(current, data_cfg)
            why = "; ".join(changed) if changed else (
                "no split setting differs, so the files behind data.root / data.metadata / the split lists do")
            info["problems"].append(f"the {' and '.join(moved)} split built here differs from the one the checkpoint "
                                    f"was trained with ({why})")
    if name != "train":
        info["patients_also_in_train"] = _training_overlap(record, table, info["problems"], name=name, ids=ids, key=key,
                                                           whole=whole, external=external)
    info["statements"] = ([IMAGE_WISE] if info["image_wise"] else []) + list(record.get("allowed", []))
    if external:
        n = info["patients_also_in_train"]
        checked = "not checked" if n is None else "checked: none shared" if n == 0 else f"but {n} are"
        info["statements"].append(f"{EXTERNAL_SITE}; {checked}")
    if name != "val" and ids and key is not None:
        # Validation patients chose checkpoints and operating points: not refused, but said.
        seen = keyed_hashes(_units(table, False), key)
        chose = sum(len(seen & set(r["val"].get("hashes") or [])) for r in record["runs"].values()
                    if r.get("key_id") == key_id(key))
        info["patients_also_in_validation"] = chose
        if chose:
            info["statements"].append(f"{chose} of the {name} set's patients were validation patients of a run "
                                      f"behind this checkpoint (they chose its epochs and operating points)")
    info["train"] = {k: current.get("train", {}).get(k) for k in ("images", "patients")}
    info["val"] = {k: current.get("val", {}).get(k) for k in ("images", "patients")}
    info["runs"] = len(record["runs"])
    if info["problems"] and not allow:
        raise ProvenanceError(
            f"refusing to evaluate: {'; and '.join(info['problems'])}. The numbers would not be a held-out evaluation "
            f"of this checkpoint (and operating points chosen here could be fitted to training patients). Evaluate "
            f"with the training run's split settings, or pass --allow-other-split to evaluate anyway (every report "
            f"then says so)")
    return info


def _training_overlap(record: dict[str, Any], table: pd.DataFrame, problems: list[str], *, name: str, ids: bool,
                      key: bytes | None, whole: pd.DataFrame | None, external: bool) -> int | None:
    """Patients of ``table`` that a run behind the checkpoint trained on (None: not counted), each
    overlap appended to ``problems``; an overlap that cannot be checked is a problem too, unless
    the set is declared ``external``."""
    units = _units(table, False) if ids else None
    outside = whole is not None and not set(_units(table, not ids)) & _units(whole[whole["split"] == "train"], not ids)
    total, unknown = 0, []
    for rid, n, why in _overlaps(record, units, not ids, key, whole, outside):
        if n:
            problems.append(f"{n} of the {len(units)} patients of the {name} set have images {_who(record, rid)} was "
                            f"trained on" + (" (although --external-site declares them another site's)" if external else ""))
            total += n
        elif n is None:
            unknown.append(f"{_who(record, rid)}: {why}")
    if unknown and not external:
        problems.append(f"whether the {name} set holds training patients cannot be checked for " + "; ".join(unknown))
    return total if not unknown and ids else None


def _moved(run: dict[str, Any], part: pd.DataFrame, split: str) -> bool:
    """The rebuilt ``split`` differs from the run's record of it (counts or set digests)."""
    want = run[split]
    now = split_summary(part, run["id"])
    return any(want.get(k) != now.get(k) for k in ("images", "patients", "patients_digest", "images_digest"))


def statements(ckpt: dict[str, Any]) -> list[str]:
    """What every report of this checkpoint must say in its title line (image-wise split, allowed overlaps)."""
    record = upgrade(ckpt.get("split"))
    if record is None:
        return []
    wise = any(r.get("image_wise") for r in record["runs"].values())
    return ([IMAGE_WISE] if wise else []) + list(record.get("allowed", []))


def current_run(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The run record of the stage that wrote the checkpoint (settings, train / val counts), or None."""
    record = upgrade(ckpt.get("split"))
    run = record["runs"].get(record["current"]) if record else None
    return None if run is None or run.get("unrecorded") else run


def rebuilt_table(cfg) -> pd.DataFrame | None:
    """The checkpoint's whole table (every split) rebuilt from its data settings, without generating
    or writing anything; None when its files are not here."""
    from agcnn.data.datasets import load_dataframe
    from agcnn.data.tables import load_table
    from agcnn.errors import AgcnnError

    d = cfg.data
    try:
        if d.dataset == "synthetic":
            # load_dataframe would generate a missing phantom set: read what is there instead.
            path = Path(d.root) / "labels.csv"
            if not path.is_file():
                return None
            return load_table(path, list(cfg.labels), path_column="path", patient_column="patient", views=d.views,
                              val_fraction=d.val_fraction, test_fraction=d.test_fraction, split_seed=d.split_seed)
        return load_dataframe(cfg)
    except (AgcnnError, OSError, ValueError):
        return None


def check_boxed_images(ckpt: dict[str, Any], cfg, paths: Iterable[str], *, allow: bool = False,
                       key: bytes | None = None, external: bool = False) -> dict[str, Any]:
    """:func:`check_evaluated_set` for the images of a box table (``agcnn localize``).

    Each image's patient comes from the checkpoint's own table, rebuilt from its data settings
    when its files are here (matched by file name), else from a ChestX-ray14 file name
    (``<patient>_<follow-up>.png``). An image whose patient is known neither way cannot be
    checked, which is refused like an overlap unless ``external`` (``--external-site``) declares
    the table another site's; a known patient the training data holds is refused either way.
    """
    from agcnn.data.chestxray14 import patient_from_name

    names = sorted(set(image_names(paths)))
    if upgrade(ckpt.get("split")) is None:
        info = check_evaluated_set(ckpt, pd.DataFrame({"path": names, "patient": names}), name="boxed images",
                                   allow=allow, key=key, external=external)
        info["caveats"] = info["statements"]
        return info
    whole = rebuilt_table(cfg)
    known: dict[str, str] = {}
    if whole is not None:
        known = dict(zip(image_names(whole["path"]), whole["patient"].astype(str)))
    nih = re.compile(r"\d+_\d+\.\w+")
    patients = [known.get(n) or (patient_from_name(n) if nih.fullmatch(n) else None) for n in names]
    unknown = [n for n, p in zip(names, patients) if p is None]
    table = pd.DataFrame({"path": [n for n, p in zip(names, patients) if p is not None],
                          "patient": [p for p in patients if p is not None]})
    info = check_evaluated_set(ckpt, table, name="boxed images", whole=whole, allow=True, key=key, external=external)
    if unknown and external:
        # The declaration covers what no key here can check: say how much that is.
        info["statements"] = [s for s in info["statements"] if not s.startswith(EXTERNAL_SITE)] + [
            f"{EXTERNAL_SITE}; {len(unknown)} of the {len(names)} boxed images not checked"
            + (f", the other {len(table)} checked: none shared" if len(table) else "")]
    elif unknown:
        info["problems"].append(f"the patients of {len(unknown)} of the {len(names)} boxed images are not known (not in "
                                f"the checkpoint's table, rebuilt from its data settings, nor named like ChestX-ray14 "
                                f"files), so they cannot be checked against the training patients")
    info["allowed_other_split"] = allow
    # What the title line of every report of these boxes says.
    info["caveats"] = info["statements"] + ([f"--allow-other-split: {'; and '.join(info['problems'])}"]
                                            if info["problems"] else [])
    if info["problems"] and not allow:
        raise ProvenanceError(
            f"refusing to localise: {'; and '.join(info['problems'])}. Boxes on images of training patients measure "
            f"what the model memorised; score boxes on held-out patients, or pass --allow-other-split to score anyway "
            f"(every report then says so)")
    return info
