from __future__ import annotations

import subprocess
import sys

import pytest

from agcnn import __version__
from agcnn.cli import main
from agcnn.config import Config, ConfigError

# Every command the README documents, and its module; deleting or renaming one must fail here.
COMMAND_MODULES = {"demo": "agcnn.demo", "train": "agcnn.train.command", "evaluate": "agcnn.evaluate", "predict": "agcnn.predict.command",
                   "merge": "agcnn.predict.merge", "localize": "agcnn.localize", "prepare": "agcnn.data.prepare",
                   "phantoms": "agcnn.data.synthetic", "send": "agcnn.dicomnet.send", "serve": "agcnn.dicomnet.serve"}


def test_version():
    out = subprocess.run([sys.executable, "-m", "agcnn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"agcnn {__version__}"


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_each_command_has_its_own_parser(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    # The command's own usage line, not the top-level help that merely mentions its name.
    assert capsys.readouterr().out.startswith(f"usage: agcnn {command} ")


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit"])
    assert e.value.code == 2
    assert "invalid choice: 'fit'" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def _imported_after(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``agcnn ARGV`` in a fresh interpreter; return it and the agcnn modules it imported."""
    code = (
        "import sys\n"
        "from agcnn.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', ' '.join(sorted(m for m in sys.modules if m.startswith('agcnn'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES"))
    return out, set(line.split()[1:])


def test_top_level_help_lists_every_command_and_imports_none():
    out, modules = _imported_after(["--help"])
    listed = out.stdout.split("positional arguments:")[1].split("options:")[0]
    for name in COMMAND_MODULES:
        assert f"    {name} " in listed, f"{name} missing from agcnn --help"
    assert not modules & set(COMMAND_MODULES.values())


@pytest.mark.parametrize("command", ["demo", "predict"])
def test_command_help_imports_that_command_only(command):
    out, modules = _imported_after([command, "--help"])
    assert f"usage: agcnn {command}" in out.stdout
    assert COMMAND_MODULES[command] in modules
    # The demo generates phantoms: the phantoms command's module is a library module to it.
    needed = {"demo": {"agcnn.data.synthetic"}}.get(command, set())
    others = {m for c, m in COMMAND_MODULES.items() if c != command} - needed
    assert not modules & others, f"agcnn {command} --help imported {sorted(modules & others)}"
    assert "agcnn.train" not in modules


def test_user_errors_are_one_line_with_their_exit_status(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("model:\n  backbone: resnet5\n")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "agcnn", "train", "--config", str(bad), "--out", str(run)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "agcnn train: error: invalid config value: model.backbone='resnet5' is not a valid choice; "
        "valid: resnet50, densenet121, resnet18. Did you mean 'resnet50'?"
    ]
    assert not run.exists()  # nothing written
    # --debug (or AGCNN_DEBUG=1) shows the traceback instead.
    out = subprocess.run([sys.executable, "-m", "agcnn", "--debug", "train", "--config", str(bad), "--out", str(run)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr
    with pytest.raises(ConfigError):  # the same after the command
        main(["train", "--debug", "--config", str(bad), "--out", str(run)])


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/out"],
        ["predict", "--checkpoint", "{tmp}/missing.pt", "--input", "{tmp}", "--output", "{tmp}/out"],
        ["train", "--config", "{tmp}/c.yaml", "--stage", "local", "--out", "{tmp}/out"],
    ],
    ids=["evaluate", "predict", "train"],
)
def test_a_missing_checkpoint_exits_2_in_every_command(argv, tmp_path, capsys):
    from agcnn.config import Config

    Config.load(None, ["model.backbone=resnet18", "train.device=cpu"]).dump(tmp_path / "c.yaml")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_error_classes_carry_their_exit_status_and_old_bases():
    from agcnn import errors
    from agcnn.checkpoint import CheckpointError
    from agcnn.config import ConfigError
    from agcnn.data.cache import CacheMismatchError
    from agcnn.data.datasets import ImageLoadError
    from agcnn.data.readers import UnusableImageError
    from agcnn.labels import LabelMismatchError

    for cls, code, old in [(ConfigError, 2, ValueError), (CheckpointError, 2, ValueError), (LabelMismatchError, 2, ValueError),
                           (CacheMismatchError, 2, ValueError), (errors.DataError, 2, ValueError),
                           (ImageLoadError, 1, RuntimeError), (UnusableImageError, 1, Exception)]:
        assert issubclass(cls, errors.AgcnnError) and issubclass(cls, old)
        assert cls.exit_code == code, cls


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.dataset=csv", "data.metadata={tmp}/no-table.csv"], "label table"),
        (["data.dataset=chestxray14", "data.root={tmp}/nih"], "train_val_list.txt"),
        (["model.pretrained={tmp}/resnet18.pth"], "model.pretrained="),
    ],
    ids=["csv-table", "nih-metadata", "pretrained"],
)
def test_files_the_config_names_are_usage_errors(overrides, message, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "nih").mkdir()
    Config.load(None, ["model.backbone=resnet18", "train.device=cpu", "model.pretrained=none",
                       *[o.format(tmp=tmp_path) for o in overrides]]).dump(cfg)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("agcnn train: error: ")
    assert not (tmp_path / "out").exists()
