"""agcnn.libmessages: the DICOM libraries' messages are counted by kind and file, never shown."""

from __future__ import annotations

import logging
import warnings

from agcnn import libmessages


def test_library_log_records_and_warnings_are_counted_not_shown(capsys):
    pydicom_logger = logging.getLogger("pydicom")
    before = (pydicom_logger.propagate, pydicom_logger.level, list(pydicom_logger.handlers))
    with libmessages.installed() as tally:
        logging.getLogger("highdicom.base").info('copy attributes from dataset "1.2.3.SECRETUID"')
        logging.getLogger("pydicom").warning("value SECRETNAME is odd")
        with libmessages.for_file("a/b.dcm") as caught:
            logging.getLogger("pydicom").error("decoder failed on SECRETNAME", exc_info=ValueError("SECRETNAME"))
            warnings.warn("The string SECRETNAME is unlikely to be a name", UserWarning)
        assert sum(caught.values()) == 2
        logging.getLogger("agcnn.other").warning("not a DICOM library: shown")
        lines = tally.lines()
        as_dict = tally.as_dict()
    err = capsys.readouterr().err
    assert "SECRET" not in err + " ".join(lines) + str(as_dict)
    assert sum(tally.counts.values()) == 4
    kinds = dict(tally.counts)
    assert kinds["highdicom INFO (test_libmessages.test_library_log_records_and_warnings_are_counted_not_shown)"] == 1
    assert any(k.startswith("pydicom ERROR") for k in kinds)
    warning_kind = next(k for k in kinds if "UserWarning" in k)
    assert as_dict[warning_kind]["files"] == ["a/b.dcm"]
    assert any("first in a/b.dcm" in line for line in lines)
    # Everything is as it was after the block.
    assert (pydicom_logger.propagate, pydicom_logger.level, pydicom_logger.handlers) == before
    assert libmessages.current() is None


def test_debug_lets_them_through(caplog):
    with libmessages.installed(debug=True) as tally, caplog.at_level(logging.INFO):
        logging.getLogger("pydicom").warning("shown with --debug")
    assert "shown with --debug" in caplog.text and sum(tally.counts.values()) == 1


def test_report_prints_counts_then_clears(capsys):
    with libmessages.installed() as tally:
        with libmessages.for_file("x.dcm"):
            warnings.warn("PATIENTNAME quoted", UserWarning)
        libmessages.report("agcnn predict")
        assert not tally.counts
        libmessages.report("agcnn predict")  # nothing left: prints nothing
    err = capsys.readouterr().err
    assert err.count("messages of the DICOM libraries") == 1 and "first in x.dcm" in err and "PATIENTNAME" not in err


def test_nested_installs_share_one_tally():
    with libmessages.installed() as outer, libmessages.installed() as inner:
        assert inner is outer
        logging.getLogger("pydicom").warning("x")
    assert sum(outer.counts.values()) == 1


def test_native_stderr_of_a_block_is_kept_and_counted(capfd):
    import os

    with libmessages.installed() as tally:
        with libmessages.for_file("a.dcm", native=True):
            os.write(2, b"thread '<unnamed>' panicked at src/lib.rs:1:1:\nSECRETNAME\n")
        with libmessages.for_file("b.dcm", native=True):
            pass  # nothing written: nothing counted
        os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert "SECRETNAME" not in err and "after the block" in err
    assert dict(tally.counts) == {"stderr output of a Rust panic": 1}
    assert tally.files["stderr output of a Rust panic"] == ["a.dcm"]


def test_a_node_shows_pynetdicom_errors_by_kind_never_their_text(capsys, caplog, monkeypatch):
    from agcnn.dicomnet import serve

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # serve replaces it for its lifetime
    for name in ("pydicom", "highdicom", "pynetdicom"):
        lg = logging.getLogger(name)
        monkeypatch.setattr(lg, "level", lg.level)
        monkeypatch.setattr(lg, "handlers", list(lg.handlers))
    with libmessages.installed() as tally:
        serve.withhold_library_texts()
        serve.withhold_library_texts()  # a second node in the same process adds no second line
        try:
            raise ValueError("(0010,0010) 'DOE^SECRET' is not a valid PN")
        except ValueError as e:
            logging.getLogger("pynetdicom.dsutils").error("pydicom.write_dataset() failed:")
            logging.getLogger("pynetdicom.dsutils").exception(e)
        logging.getLogger("pynetdicom.assoc").info("Association accepted from SECRETHOST")
    shown = capsys.readouterr().err + caplog.text
    assert "SECRET" not in shown and "DOE" not in shown
    lines = [r.getMessage() for r in caplog.records if r.name == "agcnn.serve"]
    assert len(lines) == 2 and all("pynetdicom ERROR" in m and "its text is not shown" in m for m in lines)
    assert sum(n for k, n in tally.counts.items() if k.startswith("pynetdicom")) == 3
