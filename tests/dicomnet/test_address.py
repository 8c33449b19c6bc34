"""AE titles, destinations and sizes: what the send and serve options accept, and the errors that name a bad value."""

from __future__ import annotations

import pytest

from agcnn.cli import main
from agcnn.dicomnet.address import Destination, check_ae_title, parse_destination, parse_size
from agcnn.errors import UsageError


@pytest.mark.parametrize(("text", "expected"), [
    ("PACS@pacs.hospital.org:104", Destination("PACS", "pacs.hospital.org", 104)),
    ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
    ("MY AE@[::1]:11112", Destination("MY AE", "::1", 11112)),
    (" PADDED @host:1", Destination("PADDED", "host", 1)),
])
def test_destinations(text, expected):
    assert parse_destination(text) == expected
    assert parse_destination(str(expected)) == expected  # printed as it is parsed


@pytest.mark.parametrize(("text", "names"), [
    ("pacs.hospital.org:104", "names no AE title"),
    ("PACS@pacs.hospital.org", "names no port"),
    ("PACS@:104", "names no host"),
    ("PACS@host:abc", "the port 'abc' is not a number"),
    ("PACS@host:70000", "70000 is outside 1..65535"),
    ("PACS@host:0", "0 is outside 1..65535"),
    ("AN_AE_TITLE_OF_17@host:104", "has 17 characters"),
    ("BAD\\AE@host:104", "character an AE title cannot"),
    ("   @host:104", "is empty"),
    ("PACS@[::1:104", "IPv6 host is written [HOST]:PORT"),
])
def test_bad_destinations_name_the_value(text, names):
    with pytest.raises(UsageError, match="--to") as e:
        parse_destination(text, "--to")
    assert names in str(e.value)
    assert repr(text) in str(e.value)


def test_ae_title_and_size():
    assert check_ae_title("AGCNN", "--ae-title") == "AGCNN"
    with pytest.raises(UsageError, match=r"--allow-ae 'ÄRZTE' holds a character"):
        check_ae_title("ÄRZTE", "--allow-ae")
    assert parse_size("10G", "--inbox-limit") == 10 << 30
    assert parse_size("1.5M", "--inbox-limit") == int(1.5 * (1 << 20))
    assert parse_size("2048", "--inbox-limit") == 2048
    assert parse_size("512KiB", "--inbox-limit") == 512 << 10
    for bad in ("ten", "10X", "0", "-1G"):
        with pytest.raises(UsageError, match=f"--inbox-limit '{bad}'"):
            parse_size(bad, "--inbox-limit")


def test_command_line_errors_exit_2_naming_the_value(tmp_path, capsys):
    assert main(["send", str(tmp_path), "--to", "PACS@host"]) == 2
    assert "--to 'PACS@host' names no port" in capsys.readouterr().err
    assert main(["send", str(tmp_path / "missing"), "--to", "PACS@127.0.0.1:104"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["send", str(tmp_path), "--to", "PACS@127.0.0.1:104", "--tls-ca", str(tmp_path / "ca.pem")]) == 2
    assert f"--tls-ca {str(tmp_path / 'ca.pem')!r} is not a file" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "node"),
                 "--forward", "PACS@host:x"]) == 2
    assert "--forward 'PACS@host:x': the port 'x' is not a number" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "node"),
                 "--inbox-limit", "lots"]) == 2
    assert "--inbox-limit 'lots' is not a size" in capsys.readouterr().err
